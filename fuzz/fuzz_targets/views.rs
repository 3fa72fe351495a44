//! The views file is operator input, but a typo must give a message naming
//! the problem, never a panic or a stack overflow in the parser.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(views) = tally::views::parse_views(sql) {
        // What a parsed view renders must itself be usable: every view has
        // a source table and the SELECT that defines it.
        for view in views {
            assert!(!view.select_sql.is_empty(), "{view:?}");
        }
    }
});
