//! Partner results (`settlement.result`) and gateway receipts (`delivery.receipt`) from raw bytes:
//! the body check (`messages::parse_body`), then the schema check and typed read of both types
//! (`schema::decode`), whatever type the body claims, so that the fuzzer explores both schemas.
#![no_main]

use assetflow::contracts::schema;
use assetflow::contracts::messages::{self, DeliveryReceipt, SettlementResult, kinds};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((_, json)) = messages::parse_body(data) else {
        return;
    };
    if let Ok(result) = schema::decode::<SettlementResult>(kinds::SETTLEMENT_RESULT, &json) {
        assert!(!result.partner_id.is_empty(), "the schema lets an empty partner id through");
    }
    if let Ok(receipt) = schema::decode::<DeliveryReceipt>(kinds::DELIVERY_RECEIPT, &json) {
        assert_eq!(receipt.sha256.len(), 64, "the schema lets a digest of the wrong length through");
    }
});
