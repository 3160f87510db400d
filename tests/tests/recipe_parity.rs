//! Our preprocessing against the Python recipe (transformers' fast Gemma tokenizer), on every sample row.

use arena_judge_tests::{gemma, gemma_hf, ids_hash, recipe_fixture, root, short_hash};
use shared::data::{Format, load_file};
use shared::preprocess::{PreprocessConfig, preprocess_record, template};
use shared::truncate::smart_truncate;

#[test]
fn fixture_was_made_with_this_tokenizer() {
    assert_eq!(
        recipe_fixture().tokenizer_sha256,
        gemma().sha256,
        "regenerate with scripts/make_preprocess_fixture.py"
    );
}

#[test]
fn every_sample_row_matches_the_recipe_text_and_ids() {
    let config = PreprocessConfig::default();
    for (file, expected) in &recipe_fixture().files {
        let records = load_file(&root().join(file), Format::Auto).unwrap().records;
        assert_eq!(records.len(), expected.len(), "{file}: row count");
        let mut full = 0;
        for (r, e) in records.iter().zip(expected) {
            assert_eq!(r.id, e.id, "{file}: row order");
            assert_eq!(
                r.label.map(|l| l.as_str()),
                Some(e.winner.as_str()),
                "{file}: label of {}",
                r.id
            );
            let t = template(gemma(), &config, &r.prompt, &r.response_a, &r.response_b).unwrap();
            assert_eq!(
                short_hash(&t.text),
                e.text_sha,
                "{file}: templated text of {}",
                r.id
            );
            let ids = preprocess_record(gemma(), &config, r, false)
                .unwrap()
                .input_ids;
            assert_eq!(ids.len(), e.n_ids, "{file}: length of {}", r.id);
            assert!(ids.len() <= config.max_length);
            if let Some(full_ids) = &e.ids {
                assert_eq!(&ids, full_ids, "{file}: ids of {}", r.id);
                full += 1;
            }
            assert_eq!(ids_hash(&ids), e.ids_sha, "{file}: ids of {}", r.id);
        }
        assert!(full >= 8, "{file}: fixture has {full} rows in full");
    }
}

#[test]
fn rows_cut_at_max_length_keep_bos_and_eos() {
    let config = PreprocessConfig::default();
    let records = load_file(&root().join("data/arena-sample.parquet"), Format::Auto)
        .unwrap()
        .records;
    let cut: Vec<_> = records
        .iter()
        .map(|r| preprocess_record(gemma(), &config, r, false).unwrap())
        .filter(|e| e.cut)
        .collect();
    assert!(!cut.is_empty());
    for e in cut {
        assert_eq!(e.input_ids.len(), 512);
        assert_eq!(e.input_ids[0], gemma().bos_id);
        assert_eq!(e.input_ids[511], gemma().eos_id);
    }
}

#[test]
fn truncation_edge_cases_match_the_recipe_string_for_string() {
    let cases = &recipe_fixture().truncation;
    let mut snipped = 0;
    for c in cases {
        for tok in [gemma(), gemma_hf()] {
            let out = smart_truncate(tok, &c.text, c.budget).unwrap();
            assert_eq!(
                out.text,
                c.out,
                "{} engine, budget {}, text {:?}",
                tok.engine_name(),
                c.budget,
                c.text
            );
            snipped += usize::from(out.snipped);
        }
    }
    // The cases must exercise the cut, including cuts inside characters (U+FFFD in the recipe's output).
    assert!(snipped > cases.len());
    assert!(
        cases
            .iter()
            .any(|c| c.out.contains('\u{FFFD}') && !c.text.contains('\u{FFFD}'))
    );
}

#[test]
fn encode_matches_the_recipe_on_multilingual_text() {
    for c in &recipe_fixture().encode {
        assert_eq!(gemma().encode(&c.text).unwrap(), c.ids, "text {:?}", c.text);
        assert_eq!(
            gemma_hf().encode(&c.text).unwrap(),
            c.ids,
            "text {:?}",
            c.text
        );
    }
}

#[test]
fn swapping_responses_swaps_them_in_the_template() {
    let config = PreprocessConfig::default();
    let records = load_file(&root().join("data/arena-sample.parquet"), Format::Auto)
        .unwrap()
        .records;
    let r = &records[0];
    let swapped = preprocess_record(gemma(), &config, r, true).unwrap();
    let by_hand =
        shared::preprocess::preprocess(gemma(), &config, &r.prompt, &r.response_b, &r.response_a)
            .unwrap();
    assert_eq!(swapped, by_hand);
    assert_ne!(
        swapped.input_ids,
        preprocess_record(gemma(), &config, r, false)
            .unwrap()
            .input_ids
    );
}
