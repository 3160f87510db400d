//! Fetching a `trainer export` web bundle: its manifest, then each file from the browser's Cache Storage (a
//! reload downloads nothing) or the network, checked against the manifest's size and sha256. The weights are
//! streamed: each chunk goes on (to the model loader) as it arrives, and the whole file is never held.

use js_sys::{Reflect, Uint8Array};
use sha2::{Digest, Sha256};
use shared::bundle::{BundleFile, BundleManifest, BundleWeights};
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{Cache, ReadableStreamDefaultReader, Response};

use crate::error::WebError;

/// The cache that holds downloaded bundle files, by URL.
pub const CACHE_NAME: &str = "arena-judge-bundles-v1";

/// `base` with a trailing slash.
pub fn normalize_base(base: &str) -> String {
    if base.ends_with('/') {
        base.to_string()
    } else {
        format!("{base}/")
    }
}

/// `fetch` on the page or in a worker.
async fn fetch(url: &str) -> Result<Response, WebError> {
    let global = js_sys::global();
    let promise = if let Some(w) = global.dyn_ref::<web_sys::Window>() {
        w.fetch_with_str(url)
    } else if let Some(w) = global.dyn_ref::<web_sys::WorkerGlobalScope>() {
        w.fetch_with_str(url)
    } else {
        return Err(WebError::Js("no fetch in this context".into()));
    };
    let resp = JsFuture::from(promise).await.map_err(|e| WebError::Fetch {
        url: url.into(),
        message: WebError::js(e).to_string(),
    })?;
    let resp: Response = resp.dyn_into().map_err(WebError::js)?;
    if !resp.ok() {
        return Err(WebError::Http {
            url: url.into(),
            status: resp.status(),
            text: resp.status_text(),
        });
    }
    Ok(resp)
}

async fn open_cache() -> Option<Cache> {
    let global = js_sys::global();
    // Cache Storage exists only in secure contexts (https, localhost); elsewhere files are fetched each time.
    let caches = if let Some(w) = global.dyn_ref::<web_sys::Window>() {
        w.caches().ok()?
    } else {
        global
            .dyn_ref::<web_sys::WorkerGlobalScope>()?
            .caches()
            .ok()?
    };
    JsFuture::from(caches.open(CACHE_NAME))
        .await
        .ok()?
        .dyn_into()
        .ok()
}

/// Reads a response body chunk by chunk.
async fn read_chunks(
    resp: &Response,
    mut chunk: impl FnMut(&[u8]) -> Result<(), WebError>,
) -> Result<(), WebError> {
    let Some(body) = resp.body() else {
        return Ok(());
    };
    let reader: ReadableStreamDefaultReader = body
        .get_reader()
        .dyn_into()
        .map_err(|o: js_sys::Object| WebError::js(o.into()))?;
    let mut buf = Vec::new();
    loop {
        let next = JsFuture::from(reader.read()).await.map_err(WebError::js)?;
        let done = Reflect::get(&next, &"done".into())
            .map_err(WebError::js)?
            .as_bool()
            .unwrap_or(true);
        if done {
            return Ok(());
        }
        let value: Uint8Array = Reflect::get(&next, &"value".into())
            .map_err(WebError::js)?
            .dyn_into()
            .map_err(WebError::js)?;
        buf.resize(value.length() as usize, 0);
        value.copy_to(&mut buf);
        chunk(&buf)?;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A bundle whose manifest is read.
pub struct Bundle {
    pub base: String,
    pub manifest: BundleManifest,
    pub weights: BundleWeights,
    cache: Option<Cache>,
}

impl Bundle {
    /// Reads `base`'s manifest (`base` ends in `/`) and picks the weights in `format` when listed, else the
    /// first listed.
    pub async fn open(base: &str, format: Option<&str>) -> Result<Self, WebError> {
        let url = format!("{base}manifest.json");
        let text = JsFuture::from(fetch(&url).await?.text().map_err(WebError::js)?)
            .await
            .map_err(WebError::js)?
            .as_string()
            .unwrap_or_default();
        let bad = |message: String| WebError::Manifest {
            url: url.clone(),
            message,
        };
        let manifest: BundleManifest =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let weights = manifest
            .pick_weights(format)
            .cloned()
            .ok_or_else(|| bad("it lists no weights".into()))?;
        for name in [&manifest.config, &manifest.tokenizer, &weights.file] {
            if manifest.file_bytes(name).is_none() {
                return Err(bad(format!("{name} is not in its file list")));
            }
        }
        Ok(Self {
            base: base.into(),
            manifest,
            weights,
            cache: open_cache().await,
        })
    }

    fn entry(&self, name: &str) -> BundleFile {
        self.manifest
            .files
            .iter()
            .find(|f| f.file == name)
            .cloned()
            .unwrap_or(BundleFile {
                file: name.into(),
                bytes: 0,
                sha256: String::new(),
            })
    }

    /// Bytes of config, tokenizer and the chosen weights: what loading fetches.
    pub fn download_bytes(&self) -> u64 {
        [
            &self.manifest.config,
            &self.manifest.tokenizer,
            &self.weights.file,
        ]
        .iter()
        .filter_map(|f| self.manifest.file_bytes(f))
        .sum()
    }

    /// A whole (small) file, checked.
    pub async fn file(&self, name: &str) -> Result<(Vec<u8>, bool), WebError> {
        let mut out = Vec::new();
        let from_cache = self
            .stream(
                name,
                |c| {
                    out.extend_from_slice(c);
                    Ok(())
                },
                |_| {},
            )
            .await?;
        Ok((out, from_cache))
    }

    /// Streams file `name` into `sink`, chunk by chunk, with `progress(bytes so far)`; from the cache when it
    /// holds the file, else from the network (and then into the cache as it streams). Checked against the
    /// manifest at the end: a mismatch is an error (and a damaged cached copy is dropped, so a retry downloads).
    /// Returns whether it came from the cache.
    pub async fn stream(
        &self,
        name: &str,
        mut sink: impl FnMut(&[u8]) -> Result<(), WebError>,
        mut progress: impl FnMut(u64),
    ) -> Result<bool, WebError> {
        let entry = self.entry(name);
        let url = format!("{}{}", self.base, entry.file);
        let cached = match &self.cache {
            Some(cache) => JsFuture::from(cache.match_with_str(&url))
                .await
                .ok()
                .and_then(|hit| hit.dyn_into::<Response>().ok()),
            None => None,
        };
        let from_cache = cached.is_some();
        let (resp, put) = match cached {
            Some(resp) => (resp, None),
            None => {
                let resp = fetch(&url).await?;
                // Into the cache as it streams (the browser tees the body); kept only if the bytes check out.
                let put = match (&self.cache, resp.clone()) {
                    (Some(cache), Ok(copy)) => {
                        Some(JsFuture::from(cache.put_with_str(&url, &copy)))
                    }
                    _ => None,
                };
                (resp, put)
            }
        };
        let mut hash = Sha256::new();
        let mut bytes = 0u64;
        // After the sink fails, the rest is still read and hashed: damaged bytes are better named as a damaged
        // file than as whatever they broke downstream (a NaN weight, say).
        let mut failed = None;
        read_chunks(&resp, |chunk| {
            hash.update(chunk);
            bytes += chunk.len() as u64;
            progress(bytes);
            if failed.is_none()
                && let Err(e) = sink(chunk)
            {
                failed = Some(e);
            }
            Ok(())
        })
        .await?;
        if let Some(put) = put {
            // A full quota only costs the next visit a download.
            let _ = put.await;
        }
        if bytes != entry.bytes || hex(&hash.finalize()) != entry.sha256 {
            if let Some(cache) = &self.cache {
                let _ = JsFuture::from(cache.delete_with_str(&url)).await;
            }
            return Err(WebError::Corrupt {
                url,
                bytes,
                expected: entry.bytes,
            });
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(from_cache),
        }
    }
}

/// `name` of `base` as an absolute URL (a worker started from a blob cannot resolve relative ones).
pub fn absolute(base: &str) -> String {
    let doc_base = web_sys::window()
        .and_then(|w| w.document())
        .and_then(|d| d.base_uri().ok().flatten());
    match doc_base.and_then(|b| web_sys::Url::new_with_base(base, &b).ok()) {
        Some(u) => u.href(),
        None => base.into(),
    }
}
