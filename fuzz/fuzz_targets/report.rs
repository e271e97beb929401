//! Any delivery report: parsing never panics, and a report that parses
//! holds nothing the ledger cannot store.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sendgate_core::settle::{MAX_DETAIL_CHARS, Report};

fuzz_target!(|data: &[u8]| {
    match Report::parse(data) {
        Ok(report) => {
            if let Some(detail) = report.detail {
                assert!(detail.chars().count() <= MAX_DETAIL_CHARS);
                assert!(!detail.contains('\0'));
            }
        }
        Err(invalid) => assert!(!invalid.0.is_empty()),
    }
});
