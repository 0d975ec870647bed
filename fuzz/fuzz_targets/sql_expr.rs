#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| freshet_fuzz::sql_expr(data));
