//! The domain's tables, as diesel sees them (the runtime's own are in `runtime::db::schema`). Kept
//! in step with migrations/ by hand.

diesel::table! {
    partners (id) {
        id -> Text,
        created_at -> Timestamptz,
        public_key_pem -> Nullable<Text>,
    }
}

diesel::table! {
    issuers (id) {
        id -> Text,
        public_key_pem -> Nullable<Text>,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    gateways (id) {
        id -> Text,
        created_at -> Timestamptz,
        public_key_pem -> Nullable<Text>,
    }
}

diesel::table! {
    terminals (id) {
        id -> Text,
        kind -> Text,
        gateway_id -> Text,
        partner_id -> Nullable<Text>,
        public_key_pem -> Text,
        registered_at -> Timestamptz,
        waives_confirmation -> Bool,
    }
}

diesel::table! {
    products (id) {
        id -> Text,
        kind -> Text,
        title -> Text,
        issuer_id -> Text,
        price_minor -> Int8,
        currency -> Text,
        value_minor -> Nullable<Int8>,
        uses -> Nullable<Int4>,
        asset_expires_at -> Nullable<Timestamptz>,
        asset_validity_secs -> Nullable<Int8>,
        certificate_expires_at -> Nullable<Timestamptz>,
        certificate_validity_secs -> Nullable<Int8>,
        reminder_stage1_secs -> Int8,
        reminder_stage2_secs -> Int8,
        stage2_policy -> Text,
        transferable -> Bool,
        on_sale -> Bool,
        tags -> Jsonb,
        created_at -> Timestamptz,
        proof_of_delivery -> Text,
        confirmation_window_secs -> Int8,
        confirmation_waived -> Bool,
    }
}

diesel::table! {
    terminal_requests (request_id) {
        request_id -> Text,
        terminal_id -> Text,
        message_type -> Text,
        content_sha256 -> Text,
        sent_at -> Timestamptz,
        received_at -> Timestamptz,
        outcome -> Text,
        reason -> Nullable<Text>,
        subject_id -> Nullable<Uuid>,
    }
}

diesel::table! {
    orders (id) {
        id -> Uuid,
        request_id -> Text,
        orderer_terminal_id -> Text,
        payer_terminal_id -> Text,
        recipient_terminal_ids -> Array<Text>,
        product_id -> Text,
        quantity -> Int4,
        amount_minor -> Int8,
        currency -> Text,
        delivery_mode -> Text,
        designated_at -> Nullable<Timestamptz>,
        status -> Text,
        status_reason -> Nullable<Text>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        reserved_asset_id -> Nullable<Uuid>,
        confirm_due_at -> Nullable<Timestamptz>,
        confirmed_at -> Nullable<Timestamptz>,
        confirmation_request_id -> Nullable<Text>,
    }
}

diesel::table! {
    settlements (id) {
        id -> Uuid,
        order_id -> Uuid,
        kind -> Text,
        partner_id -> Text,
        payer_terminal_id -> Text,
        amount_minor -> Int8,
        currency -> Text,
        status -> Text,
        attempts -> Int4,
        answer_due_at -> Nullable<Timestamptz>,
        partner_reference -> Nullable<Text>,
        reason -> Nullable<Text>,
        instructed_at -> Timestamptz,
        answered_at -> Nullable<Timestamptz>,
        attempt_limit -> Nullable<Int4>,
    }
}

diesel::table! {
    assets (id) {
        id -> Uuid,
        order_id -> Uuid,
        recipient_terminal_id -> Text,
        ordinal -> Int4,
        product_id -> Text,
        kind -> Text,
        issuer_id -> Text,
        holder_terminal_id -> Text,
        issued_at -> Timestamptz,
        expires_at -> Timestamptz,
        has_exchange_certificate -> Bool,
        certificate_expires_at -> Nullable<Timestamptz>,
        status -> Text,
        transferable -> Bool,
        designated_at -> Nullable<Timestamptz>,
        value_minor -> Nullable<Int8>,
        remaining_minor -> Nullable<Int8>,
        remaining_uses -> Nullable<Int4>,
        currency -> Text,
        status_changed_at -> Timestamptz,
        replaces_asset_id -> Nullable<Uuid>,
        generation -> Int4,
    }
}

diesel::table! {
    asset_documents (asset_id) {
        asset_id -> Uuid,
        document -> Text,
        issuer_signature -> Text,
        provider_signature -> Text,
    }
}

diesel::table! {
    exchange_certificates (id) {
        id -> Uuid,
        asset_id -> Uuid,
        holder_terminal_id -> Text,
        issued_at -> Timestamptz,
        expires_at -> Timestamptz,
        exchanged_at -> Nullable<Timestamptz>,
        exchange_request_id -> Nullable<Text>,
        revoked_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    certificate_documents (certificate_id) {
        certificate_id -> Uuid,
        document -> Text,
        signature -> Text,
    }
}

diesel::table! {
    reminder_schedule (certificate_id) {
        certificate_id -> Uuid,
        asset_id -> Uuid,
        expires_at -> Timestamptz,
        next_stage -> Nullable<Int2>,
        due_at -> Nullable<Timestamptz>,
        stage1 -> Nullable<Text>,
        stage2 -> Nullable<Text>,
    }
}

diesel::table! {
    asset_status_history (id) {
        id -> Int8,
        asset_id -> Uuid,
        from_status -> Nullable<Text>,
        to_status -> Text,
        cause -> Text,
        detail -> Nullable<Text>,
        at -> Timestamptz,
    }
}

diesel::table! {
    deliveries (id) {
        id -> Uuid,
        dedupe_key -> Text,
        kind -> Text,
        terminal_id -> Text,
        gateway_id -> Text,
        order_id -> Nullable<Uuid>,
        asset_id -> Nullable<Uuid>,
        forced -> Bool,
        content -> Jsonb,
        status -> Text,
        attempts -> Int4,
        due_at -> Timestamptz,
        last_error -> Nullable<Text>,
        created_at -> Timestamptz,
        delivered_at -> Nullable<Timestamptz>,
        attempt_limit -> Nullable<Int4>,
        request_id -> Nullable<Text>,
        proof -> Nullable<Text>,
        acknowledgement -> Nullable<Jsonb>,
    }
}

diesel::table! {
    delivery_attempts (delivery_id, attempt) {
        delivery_id -> Uuid,
        attempt -> Int4,
        message_id -> Uuid,
        payload_sha256 -> Text,
        sent_at -> Timestamptz,
        outcome -> Text,
        error -> Nullable<Text>,
        finished_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    refusals (id) {
        id -> Uuid,
        request_id -> Nullable<Text>,
        terminal_id -> Nullable<Text>,
        message_type -> Text,
        reason -> Text,
        detail -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    refunds (id) {
        id -> Uuid,
        settlement_id -> Uuid,
        order_id -> Uuid,
        asset_id -> Nullable<Uuid>,
        cause -> Text,
        request_id -> Nullable<Text>,
        amount_minor -> Int8,
        currency -> Text,
        status -> Text,
        reason -> Nullable<Text>,
        requested_at -> Timestamptz,
        answered_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    booking_terms (product_id) {
        product_id -> Text,
        condition -> Text,
        places -> Nullable<Int4>,
        decided_at -> Nullable<Timestamptz>,
        window_secs -> Int8,
    }
}

diesel::table! {
    receipt_certificates (id) {
        id -> Uuid,
        request_id -> Text,
        product_id -> Text,
        holder_terminal_id -> Text,
        payer_terminal_id -> Text,
        asset_id -> Uuid,
        condition -> Text,
        status -> Text,
        issued_at -> Timestamptz,
        expires_at -> Timestamptz,
        submit_by -> Nullable<Timestamptz>,
        reminder_due_at -> Nullable<Timestamptz>,
        document -> Text,
        rank -> Nullable<Int4>,
        order_id -> Nullable<Uuid>,
        submit_request_id -> Nullable<Text>,
        status_reason -> Nullable<Text>,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    booking_decisions (product_id) {
        product_id -> Text,
        condition -> Text,
        decided_at -> Timestamptz,
        applicants -> Int4,
        outcome -> Text,
        draw -> Nullable<Text>,
    }
}

diesel::table! {
    changes (id) {
        id -> Uuid,
        request_id -> Text,
        asset_id -> Uuid,
        holder_terminal_id -> Text,
        new_product_id -> Text,
        new_order_id -> Uuid,
        refund_id -> Nullable<Uuid>,
        compensation_id -> Nullable<Uuid>,
        step -> Text,
        reason -> Nullable<Text>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    issuer_changes (id) {
        id -> Uuid,
        product_id -> Text,
        description -> Text,
        reply_by -> Timestamptz,
        default_answer -> Text,
        created_at -> Timestamptz,
        announced_by -> Text,
        issuer_id -> Nullable<Text>,
        reference -> Nullable<Text>,
    }
}

diesel::table! {
    modification_notices (id) {
        id -> Uuid,
        change_id -> Uuid,
        asset_id -> Uuid,
        holder_terminal_id -> Text,
        reply_by -> Timestamptz,
        answer -> Nullable<Text>,
        answered_by -> Nullable<Text>,
        request_id -> Nullable<Text>,
        answered_at -> Nullable<Timestamptz>,
        outcome -> Nullable<Text>,
        issued_after_change -> Bool,
    }
}

diesel::joinable!(modification_notices -> issuer_changes (change_id));
diesel::joinable!(issuer_changes -> issuers (issuer_id));
diesel::joinable!(asset_documents -> assets (asset_id));
diesel::joinable!(certificate_documents -> exchange_certificates (certificate_id));

diesel::allow_tables_to_appear_in_same_query!(
    partners,
    gateways,
    issuers,
    terminals,
    products,
    terminal_requests,
    orders,
    settlements,
    assets,
    asset_documents,
    exchange_certificates,
    certificate_documents,
    reminder_schedule,
    asset_status_history,
    deliveries,
    delivery_attempts,
    refusals,
    refunds,
    booking_terms,
    receipt_certificates,
    booking_decisions,
    changes,
    issuer_changes,
    modification_notices,
);
