//! Fetching a `trainer export` web bundle: the manifest, then each file through the browser's Cache Storage
//! (a reload does not download again), with byte progress, checked against the manifest's size and sha256.

use js_sys::{Reflect, Uint8Array};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{Cache, ReadableStreamDefaultReader, Response};

/// The cache that holds downloaded bundle files, by URL.
pub const CACHE_NAME: &str = "arena-judge-bundles-v1";

#[derive(Debug, Clone, Deserialize)]
pub struct FileEntry {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WeightsEntry {
    pub format: String,
    pub file: String,
}

/// The part of `manifest.json` the page needs.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub config: String,
    pub tokenizer: String,
    pub weights: Vec<WeightsEntry>,
    pub files: Vec<FileEntry>,
}

/// The files of a bundle, fetched and checked.
pub struct Bundle {
    pub config: Vec<u8>,
    pub tokenizer: Vec<u8>,
    pub weights_name: String,
    pub weights: Vec<u8>,
    pub total_bytes: u64,
    pub from_cache: bool,
}

fn err(e: JsValue) -> String {
    e.as_string()
        .or_else(|| {
            e.dyn_ref::<js_sys::Error>()
                .map(|e| String::from(e.message()))
        })
        .unwrap_or_else(|| format!("{e:?}"))
}

/// `base` with a trailing slash.
pub fn normalize_base(base: &str) -> String {
    if base.ends_with('/') {
        base.to_string()
    } else {
        format!("{base}/")
    }
}

async fn fetch(url: &str) -> Result<Response, String> {
    let window = web_sys::window().ok_or("no window")?;
    let resp = JsFuture::from(window.fetch_with_str(url))
        .await
        .map_err(|e| format!("{url}: cannot fetch: {}", err(e)))?;
    let resp: Response = resp.dyn_into().map_err(err)?;
    if !resp.ok() {
        return Err(format!(
            "{url}: HTTP {} {}",
            resp.status(),
            resp.status_text()
        ));
    }
    Ok(resp)
}

async fn open_cache() -> Option<Cache> {
    let window = web_sys::window()?;
    // Cache Storage exists only in secure contexts (https, localhost); elsewhere files are fetched each time.
    let caches = window.caches().ok()?;
    JsFuture::from(caches.open(CACHE_NAME))
        .await
        .ok()?
        .dyn_into()
        .ok()
}

/// Reads a response body to the end, calling `progress(bytes so far)` as chunks arrive.
async fn read_body(resp: &Response, mut progress: impl FnMut(u64)) -> Result<Vec<u8>, String> {
    let Some(body) = resp.body() else {
        return Ok(Vec::new());
    };
    let reader: ReadableStreamDefaultReader = body
        .get_reader()
        .dyn_into()
        .map_err(|o: js_sys::Object| err(o.into()))?;
    let mut out = Vec::new();
    loop {
        let chunk = JsFuture::from(reader.read()).await.map_err(err)?;
        let done = Reflect::get(&chunk, &"done".into())
            .map_err(err)?
            .as_bool()
            .unwrap_or(true);
        if done {
            break;
        }
        let value: Uint8Array = Reflect::get(&chunk, &"value".into())
            .map_err(err)?
            .dyn_into()
            .map_err(err)?;
        let start = out.len();
        out.resize(start + value.length() as usize, 0);
        value.copy_to(&mut out[start..]);
        progress(out.len() as u64);
    }
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One checked file: from the cache when it is there and intact, else downloaded (and then cached).
async fn get_file(
    base: &str,
    entry: &FileEntry,
    cache: Option<&Cache>,
    progress: &mut impl FnMut(&str, u64, u64, bool),
) -> Result<(Vec<u8>, bool), String> {
    let url = format!("{base}{}", entry.file);
    if let Some(cache) = cache
        && let Ok(hit) = JsFuture::from(cache.match_with_str(&url)).await
        && let Ok(resp) = hit.dyn_into::<Response>()
    {
        let bytes = read_body(&resp, |_| {}).await?;
        if hex(&Sha256::digest(&bytes)) == entry.sha256 {
            progress(&entry.file, entry.bytes, entry.bytes, true);
            return Ok((bytes, true));
        }
        // A stale or damaged copy: forget it and download again.
        let _ = JsFuture::from(cache.delete_with_str(&url)).await;
    }
    let resp = fetch(&url).await?;
    let for_cache = resp.clone().ok();
    let bytes = read_body(&resp, |n| progress(&entry.file, n, entry.bytes, false)).await?;
    if bytes.len() as u64 != entry.bytes || hex(&Sha256::digest(&bytes)) != entry.sha256 {
        return Err(format!(
            "{url} does not match the bundle's manifest ({} bytes, expected {}): the bundle is corrupt or mixed up",
            bytes.len(),
            entry.bytes
        ));
    }
    if let (Some(cache), Some(copy)) = (cache, for_cache) {
        let _ = JsFuture::from(cache.put_with_str(&url, &copy)).await;
    }
    Ok((bytes, false))
}

/// Fetches the bundle at `base` (a URL ending in `/`), preferring the weights in `format` when listed.
/// `progress(file, bytes, total, from_cache)` reports downloads.
pub async fn load(
    base: &str,
    format: Option<&str>,
    mut progress: impl FnMut(&str, u64, u64, bool),
) -> Result<Bundle, String> {
    let manifest_url = format!("{base}manifest.json");
    let resp = fetch(&manifest_url).await?;
    let text = JsFuture::from(resp.text().map_err(err)?)
        .await
        .map_err(err)?
        .as_string()
        .unwrap_or_default();
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| format!("{manifest_url}: not a bundle manifest: {e}"))?;
    let weights = format
        .and_then(|f| manifest.weights.iter().find(|w| w.format == f))
        .or(manifest.weights.first())
        .ok_or_else(|| format!("{manifest_url}: lists no weights"))?
        .clone();
    let entry = |name: &str| {
        manifest
            .files
            .iter()
            .find(|f| f.file == name)
            .cloned()
            .ok_or_else(|| format!("{manifest_url}: {name} is not in its file list"))
    };
    let cache = open_cache().await;
    let (config, c1) = get_file(
        base,
        &entry(&manifest.config)?,
        cache.as_ref(),
        &mut progress,
    )
    .await?;
    let (tokenizer, c2) = get_file(
        base,
        &entry(&manifest.tokenizer)?,
        cache.as_ref(),
        &mut progress,
    )
    .await?;
    let w = entry(&weights.file)?;
    let (weights_bytes, c3) = get_file(base, &w, cache.as_ref(), &mut progress).await?;
    Ok(Bundle {
        total_bytes: (config.len() + tokenizer.len() + weights_bytes.len()) as u64,
        config,
        tokenizer,
        weights_name: weights.file,
        weights: weights_bytes,
        from_cache: c1 && c2 && c3,
    })
}
