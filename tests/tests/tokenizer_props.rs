//! Properties of the fast Gemma BPE and of smart truncation, against Hugging Face `tokenizers` as the reference,
//! on random text in many scripts.

use arena_judge_tests::{gemma, gemma_hf};
use proptest::prelude::*;
use shared::truncate::{SNIP, smart_truncate};

const PIECES: &[&str] = &[
    "Hello",
    " world",
    " the",
    ", ",
    ".",
    "\n",
    "\n\n",
    "\t",
    " ",
    "  ",
    "▁",
    "<bos>",
    "<eos>",
    "<unk>",
    "<pad>",
    "<",
    "日本語",
    "中文字",
    "한국어",
    "Привет",
    "мир",
    "مرحبا",
    "עברית",
    "हिन्दी",
    "ไทย",
    "😊",
    "👍🏽",
    "🇯🇵",
    "👩‍💻",
    "🫠",
    "𠀋",
    "𝔘",
    "é",
    "e\u{301}",
    "ß",
    "\u{200b}",
    "\u{feff}",
    "\r\n",
    "```",
    "    ",
    "((",
    "1999",
    "ﬁ",
];

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(prop::sample::select(PIECES), 0..80).prop_map(|v| v.concat()),
        any::<String>(),
        "[ a-zA-Z0-9.,!?\n\t▁😊日本Ωж]{0,200}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn fast_engine_equals_tokenizers(s in text()) {
        prop_assert_eq!(gemma().encode(&s).unwrap(), gemma_hf().encode(&s).unwrap());
    }

    #[test]
    fn truncation_equals_decode_based_recipe(s in text(), budget in 4usize..64) {
        let fast = smart_truncate(gemma(), &s, budget).unwrap();
        let reference = smart_truncate(gemma_hf(), &s, budget).unwrap();
        prop_assert_eq!(&fast, &reference);
        let n = gemma().encode(&s).unwrap().len();
        prop_assert_eq!(fast.tokens, n);
        prop_assert_eq!(fast.snipped, n > budget);
        if fast.snipped {
            prop_assert!(fast.text.contains(SNIP));
        } else {
            prop_assert_eq!(fast.text.as_ref(), s.as_str());
        }
    }

    #[test]
    fn truncation_keeps_whole_characters_of_the_input(s in text(), budget in 4usize..64) {
        // Apart from the decoder's `▁` → space and U+FFFD for a cut character, the head is a prefix of the input
        // and the tail a suffix.
        let out = smart_truncate(gemma(), &s, budget).unwrap();
        if out.snipped {
            let (head, tail) = out.text.split_once(SNIP).unwrap();
            let src = s.replace('▁', " ");
            let head = head.replace('▁', " ");
            let tail = tail.replace('▁', " ");
            prop_assert!(src.starts_with(head.trim_end_matches('\u{FFFD}')), "head {:?}", head);
            prop_assert!(src.ends_with(tail.trim_start_matches('\u{FFFD}')), "tail {:?}", tail);
        }
    }
}
