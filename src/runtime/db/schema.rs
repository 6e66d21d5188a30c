//! The runtime's own tables: the inbox, the outbox, dead letters and their audit, job runs. The
//! domain's tables are in src/domain/schema.rs. Kept in step with migrations/ by hand.

diesel::table! {
    outbox (id) {
        id -> Int8,
        message_id -> Uuid,
        exchange -> Text,
        routing_key -> Text,
        message_type -> Text,
        correlation_id -> Nullable<Text>,
        headers -> Jsonb,
        payload -> Bytea,
        created_at -> Timestamptz,
        available_at -> Timestamptz,
        attempts -> Int4,
        last_error -> Nullable<Text>,
    }
}

diesel::table! {
    inbox (pool, message_id) {
        pool -> Text,
        message_id -> Text,
        message_type -> Text,
        processed_at -> Timestamptz,
    }
}

diesel::table! {
    dead_letters (id) {
        id -> Uuid,
        pool -> Text,
        source -> Text,
        message_type -> Text,
        message_id -> Nullable<Text>,
        exchange -> Nullable<Text>,
        routing_key -> Nullable<Text>,
        payload -> Bytea,
        headers -> Jsonb,
        reason -> Text,
        detail -> Text,
        attempts -> Jsonb,
        subject_id -> Nullable<Uuid>,
        created_at -> Timestamptz,
        replayed_at -> Nullable<Timestamptz>,
        replay_count -> Int4,
    }
}

diesel::table! {
    job_runs (id) {
        id -> Int8,
        job -> Text,
        as_of -> Timestamptz,
        started_at -> Timestamptz,
        finished_at -> Nullable<Timestamptz>,
        dry_run -> Bool,
        trigger -> Text,
        rows_scanned -> Int8,
        enqueued -> Int8,
        errors -> Int8,
        outcome -> Text,
        error -> Nullable<Text>,
    }
}

diesel::table! {
    dead_letter_audit (id) {
        id -> Int8,
        dead_letter_id -> Uuid,
        action -> Text,
        operator -> Text,
        note -> Nullable<Text>,
        at -> Timestamptz,
        summary -> Jsonb,
    }
}

diesel::allow_tables_to_appear_in_same_query!(outbox, inbox, dead_letters, dead_letter_audit, job_runs);
