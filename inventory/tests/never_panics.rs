//! Property tests: the parser never panics, whatever it is given, and every diagnostic points inside the input.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose; the lint guards daemons.

use proptest::prelude::*;

const BASE: &str = include_str!("fixtures/valid-lab.toml");

fn check_no_panic(text: &str) {
    match herd_inventory::parse("p.toml", text) {
        Ok(_) => assert!(text.contains("version"), "a file without `version` must be refused"),
        Err(diags) => {
            assert!(!diags.0.is_empty());
            let lines = text.split('\n').count();
            for d in &diags.0 {
                assert!(d.line >= 1 && d.line <= lines, "{d} (input has {lines} lines)");
                assert!(d.column >= 1, "{d}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text(text in "\\PC{0,400}") {
        check_no_panic(&text);
    }

    #[test]
    fn truncated_valid_file(cut in 0..BASE.len()) {
        if let Some(prefix) = BASE.get(..cut) {
            check_no_panic(prefix);
        }
    }

    #[test]
    fn valid_file_with_random_edits(edits in prop::collection::vec((0..BASE.len(), any::<char>()), 1..8)) {
        let mut chars: Vec<char> = BASE.chars().collect();
        for (at, c) in edits {
            let i = at % chars.len();
            chars[i] = c;
        }
        let text: String = chars.into_iter().collect();
        check_no_panic(&text);
    }

    #[test]
    fn valid_file_with_lines_shuffled_in(line_a in 0usize..50, line_b in 0usize..50) {
        let mut lines: Vec<&str> = BASE.lines().collect();
        let (a, b) = (line_a % lines.len(), line_b % lines.len());
        lines.swap(a, b);
        check_no_panic(&lines.join("\n"));
    }
}
