//! arena-judge in the browser. This crate compiles `shared` to wasm32 and exports its preprocessing to
//! JavaScript: the same loading, truncation and tokenization code as the trainer, so the page feeds the model
//! exactly the ids the trainer would; and the model ([`Judge`]), on WebGPU or the CPU.

mod app;
mod bundle;
mod error;
mod judge;
mod protocol;
mod worker;

pub use judge::Judge;

/// Mounts the app when loaded in a page (not under Node, where the module is used as a library).
#[wasm_bindgen(start)]
pub fn start() {
    let root = web_sys::window()
        .and_then(|w| w.document())
        .and_then(|d| d.get_element_by_id("arena-judge"))
        .and_then(|e| e.dyn_into::<web_sys::HtmlElement>().ok());
    if let Some(root) = root {
        // The page lives as long as the tab: keep it mounted.
        std::mem::forget(leptos::mount::mount_to(root, app::App));
    }
}

use bytes::Bytes;
use serde::Serialize;
use shared::data::{Format, load_bytes};
use shared::preprocess::{PreprocessConfig, preprocess_record};
use shared::tokenizer::{EnginePreference, Tokenizer};
use wasm_bindgen::prelude::*;

/// Turns comparisons into model input ids, in the browser.
#[wasm_bindgen]
pub struct Preprocessor {
    tokenizer: Tokenizer,
    config: PreprocessConfig,
}

#[derive(Serialize)]
struct PreparedRow<'a> {
    id: &'a str,
    label: &'a str,
    input_ids: Vec<u32>,
    snipped: [bool; 3],
}

#[wasm_bindgen]
impl Preprocessor {
    /// Loads a `tokenizer.json` (its bytes) with the recipe's default budgets.
    #[wasm_bindgen(constructor)]
    pub fn new(tokenizer_json: &[u8]) -> Result<Preprocessor, JsError> {
        let tokenizer = Tokenizer::from_json_bytes(
            "tokenizer.json",
            tokenizer_json,
            EnginePreference::Fastest,
        )?;
        Ok(Self {
            tokenizer,
            config: PreprocessConfig::default(),
        })
    }

    /// Which tokenizer engine is in use (`gemma-bpe` for Gemma).
    #[wasm_bindgen(getter)]
    pub fn engine(&self) -> String {
        self.tokenizer.engine_name().into()
    }

    /// Model input ids of one comparison: BOS, the truncated template, EOS.
    #[wasm_bindgen(js_name = inputIds)]
    pub fn input_ids(
        &self,
        prompt: &str,
        response_a: &str,
        response_b: &str,
    ) -> Result<Vec<u32>, JsError> {
        Ok(shared::preprocess::preprocess(
            &self.tokenizer,
            &self.config,
            prompt,
            response_a,
            response_b,
        )?
        .input_ids)
    }

    /// Every row of a parquet or CSV file (WSDM or LMSYS schema), preprocessed, as a JSON array of
    /// `{id, label, input_ids, snipped}`.
    #[wasm_bindgen(js_name = prepareFile)]
    pub fn prepare_file(&self, name: &str, bytes: &[u8]) -> Result<String, JsError> {
        let dataset = load_bytes(name, Bytes::copy_from_slice(bytes), Format::Auto)?;
        let mut rows = Vec::with_capacity(dataset.records.len());
        for r in &dataset.records {
            let e = preprocess_record(&self.tokenizer, &self.config, r, false)?;
            rows.push(PreparedRow {
                id: &r.id,
                label: r.label.map_or("", |l| l.as_str()),
                input_ids: e.input_ids,
                snipped: e.snipped,
            });
        }
        Ok(serde_json::to_string(&rows)?)
    }
}
