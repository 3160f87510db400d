//! The Gemma tokenizer, loaded from a Hugging Face `tokenizer.json`.
//!
//! Gemma's tokenizer is a SentencePiece-style BPE: no pre-tokenizer, so a whole field is one "word" for the BPE;
//! spaces are normalised to `▁`; characters missing from the vocabulary fall back to `<0xXX>` byte tokens.
//!
//! Two engines give the same ids:
//! - [`GemmaBpe`], our own implementation of exactly this shape, used whenever a `tokenizer.json` has it. It runs the
//!   same merge procedure as Hugging Face `tokenizers` (lowest merge rank first, leftmost on ties) but without the
//!   per-byte alignment tracking, the per-token `String`s and the `Encoding` bookkeeping that dominate the cost of a
//!   long, un-pre-tokenized input. Tests compare it id-for-id with `tokenizers` on real rows and random text.
//! - `tokenizers` itself for any other tokenizer (and as the reference in tests).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rustc_hash::{FxHashMap, FxHashSet};
use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{file}: cannot read the tokenizer: {message}")]
    Read { file: String, message: String },
    #[error("{file}: not a valid tokenizer.json: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: the tokenizer has no {token:?} token")]
    MissingSpecial { file: String, token: &'static str },
    #[error("tokenization failed: {0}")]
    Encode(String),
}

/// `▁` (U+2581), SentencePiece's visible space.
pub const SPACE_MARK: char = '\u{2581}';

/// A loaded tokenizer with the special tokens the pipeline needs.
pub struct Tokenizer {
    engine: Engine,
    pub bos_id: u32,
    pub eos_id: u32,
    pub pad_id: u32,
    /// sha256 of the `tokenizer.json` bytes, recorded in caches and bundles.
    pub sha256: String,
    /// One more than the largest id the tokenizer can produce: a model's `vocab_size` must be at least this.
    pub vocab_size: usize,
}

enum Engine {
    Gemma(Box<GemmaBpe>),
    Hf(Box<tokenizers::Tokenizer>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("engine", &self.engine_name())
            .field("sha256", &self.sha256)
            .finish()
    }
}

/// Which implementation to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnginePreference {
    /// [`GemmaBpe`] when the tokenizer has its shape, else `tokenizers`.
    Fastest,
    /// Always Hugging Face `tokenizers` (the reference).
    HuggingFace,
}

/// Ids of one text and, per token, its byte range in that text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Encoding {
    pub ids: Vec<u32>,
    /// `[start, end)` byte offsets into the input text. A character split into byte tokens gives each byte token
    /// the range of its one byte.
    pub offsets: Vec<(u32, u32)>,
}

impl Tokenizer {
    #[cfg(feature = "native")]
    pub fn from_file(path: &std::path::Path) -> Result<Self, TokenizerError> {
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| TokenizerError::Read {
            file: file.clone(),
            message: e.to_string(),
        })?;
        Self::from_json_bytes(&file, &bytes, EnginePreference::Fastest)
    }

    /// Parses a `tokenizer.json`. `name` only labels errors.
    pub fn from_json_bytes(
        name: &str,
        bytes: &[u8],
        preference: EnginePreference,
    ) -> Result<Self, TokenizerError> {
        let parse_err = |message: String| TokenizerError::Parse {
            file: name.into(),
            message,
        };
        let json: TokenizerJson =
            serde_json::from_slice(bytes).map_err(|e| parse_err(e.to_string()))?;
        let special = |token: &'static str| -> Result<u32, TokenizerError> {
            json.added_tokens
                .iter()
                .find(|t| t.content == token)
                .map(|t| t.id)
                .or_else(|| json.model.vocab.get(token).copied())
                .ok_or(TokenizerError::MissingSpecial {
                    file: name.into(),
                    token,
                })
        };
        let (bos_id, eos_id, pad_id) = (special("<bos>")?, special("<eos>")?, special("<pad>")?);
        let engine = match (preference, GemmaBpe::from_json(&json)) {
            (EnginePreference::Fastest, Some(bpe)) => Engine::Gemma(Box::new(bpe)),
            _ => {
                let mut hf = tokenizers::Tokenizer::from_bytes(bytes)
                    .map_err(|e| parse_err(e.to_string()))?;
                // The pipeline truncates and pads itself; a tokenizer.json may carry its own settings.
                hf.with_truncation(None)
                    .map_err(|e| parse_err(e.to_string()))?;
                hf.with_padding(None);
                Engine::Hf(Box::new(hf))
            }
        };
        let sha256 = hex(&Sha256::digest(bytes));
        let vocab_size = json
            .model
            .vocab
            .values()
            .copied()
            .chain(json.added_tokens.iter().map(|t| t.id))
            .max()
            .map_or(0, |m| m as usize + 1);
        Ok(Self {
            engine,
            bos_id,
            eos_id,
            pad_id,
            sha256,
            vocab_size,
        })
    }

    /// How many chunks (word-like pieces) each thread remembers the tokens of; 0 turns the cache off. It only
    /// changes speed, never ids.
    pub fn set_cache_capacity(&mut self, chunks: usize) {
        if let Engine::Gemma(bpe) = &mut self.engine {
            bpe.cache_capacity = chunks;
        }
    }

    pub fn engine_name(&self) -> &'static str {
        match self.engine {
            Engine::Gemma(_) => "gemma-bpe",
            Engine::Hf(_) => "huggingface-tokenizers",
        }
    }

    /// Token ids of `text`, without BOS or EOS.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match &self.engine {
            Engine::Gemma(bpe) => {
                let mut out = Encoding::default();
                bpe.encode_into(text, &mut out, false);
                Ok(out.ids)
            }
            Engine::Hf(hf) => Ok(hf
                .encode_fast(text, false)
                .map_err(|e| TokenizerError::Encode(e.to_string()))?
                .get_ids()
                .to_vec()),
        }
    }

    /// Counts the tokens of `text` and, when there are more than `budget`, decodes its first `head` and last
    /// `tail` tokens exactly as Hugging Face's `decode` would (see [`crate::truncate`]).
    pub(crate) fn head_tail(
        &self,
        text: &str,
        budget: usize,
        head: usize,
        tail: usize,
    ) -> Result<HeadTail, TokenizerError> {
        match &self.engine {
            Engine::Gemma(bpe) => {
                let mut enc = Encoding::default();
                bpe.encode_into(text, &mut enc, true);
                let n = enc.ids.len();
                if n <= budget {
                    return Ok(HeadTail {
                        tokens: n,
                        pieces: None,
                    });
                }
                let head_text = bpe.decode_span(text, &enc, 0..head);
                let tail_text = bpe.decode_span(text, &enc, n - tail..n);
                Ok(HeadTail {
                    tokens: n,
                    pieces: Some((head_text, tail_text)),
                })
            }
            Engine::Hf(hf) => {
                let ids = hf
                    .encode_fast(text, false)
                    .map_err(|e| TokenizerError::Encode(e.to_string()))?
                    .get_ids()
                    .to_vec();
                let n = ids.len();
                if n <= budget {
                    return Ok(HeadTail {
                        tokens: n,
                        pieces: None,
                    });
                }
                let decode = |ids: &[u32]| {
                    hf.decode(ids, false)
                        .map_err(|e| TokenizerError::Encode(e.to_string()))
                };
                Ok(HeadTail {
                    tokens: n,
                    pieces: Some((decode(&ids[..head])?, decode(&ids[n - tail..])?)),
                })
            }
        }
    }
}

pub(crate) struct HeadTail {
    pub tokens: usize,
    pub pieces: Option<(String, String)>,
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------------------------
// tokenizer.json, only the parts we read.

#[derive(Deserialize)]
struct TokenizerJson {
    #[serde(default)]
    added_tokens: Vec<AddedToken>,
    #[serde(default)]
    normalizer: Option<serde_json::Value>,
    #[serde(default)]
    pre_tokenizer: Option<serde_json::Value>,
    model: ModelJson,
}

#[derive(Deserialize)]
struct AddedToken {
    id: u32,
    content: String,
    #[serde(default)]
    single_word: bool,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
    #[serde(default)]
    normalized: bool,
}

#[derive(Deserialize)]
struct ModelJson {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    dropout: Option<f32>,
    #[serde(default)]
    continuing_subword_prefix: Option<String>,
    #[serde(default)]
    end_of_word_suffix: Option<String>,
    #[serde(default)]
    byte_fallback: bool,
    #[serde(default)]
    ignore_merges: bool,
    #[serde(default)]
    vocab: FxHashMap<String, u32>,
    #[serde(default)]
    merges: Vec<MergeJson>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MergeJson {
    Legacy(String),
    Pair(String, String),
}

// ---------------------------------------------------------------------------------------------------------------
// The Gemma BPE engine.

/// Marks "not in the vocabulary" in the ASCII table.
const NONE: u32 = u32::MAX;

/// SentencePiece-style BPE over a whole text: `' '` → `▁`, byte fallback, no pre-tokenizer.
pub struct GemmaBpe {
    /// Id of each ASCII character, with `' '` already mapped to `▁`.
    ascii: [u32; 128],
    /// Id of every other single-character token.
    chars: FxHashMap<char, u32>,
    /// `<0xXX>` token of each byte.
    bytes: [u32; 256],
    /// `(left, right)` → `(rank, merged id)`, packed as `left << 32 | right` → `rank << 32 | id`.
    merges: FxHashMap<u64, u64>,
    /// Added tokens (all `normalized: false`, no stripping), longest first, split out of the raw text before BPE.
    added: Vec<(String, u32)>,
    added_first_bytes: [bool; 256],
    /// Whether an id is a byte-fallback token, for decoding.
    is_byte: FxHashMap<u32, u8>,
    /// Adjacent character pairs that occur inside some token (see [`GemmaBpe::segment`]), for pairs of ASCII
    /// characters as a bit table (`▁` takes the slot of the space it replaces) and for the rest as a set.
    joinable_ascii: [u128; 128],
    joinable: FxHashSet<u64>,
    /// Chunks remembered per thread; 0 turns the cache off.
    cache_capacity: usize,
    /// Tells this instance's entries in the per-thread cache from another instance's.
    instance: u64,
}

impl GemmaBpe {
    /// Builds the engine when `json` has exactly the shape it implements; `None` otherwise.
    fn from_json(json: &TokenizerJson) -> Option<Self> {
        let normalizer_ok = match &json.normalizer {
            None | Some(serde_json::Value::Null) => true,
            Some(n) => {
                n.get("type").and_then(|t| t.as_str()) == Some("Replace")
                    && n.pointer("/pattern/String").and_then(|s| s.as_str()) == Some(" ")
                    && n.get("content").and_then(|c| c.as_str()) == Some("\u{2581}")
            }
        };
        let m = &json.model;
        let shape_ok = normalizer_ok
            && matches!(json.pre_tokenizer, None | Some(serde_json::Value::Null))
            && m.kind.as_deref().is_none_or(|k| k == "BPE")
            && m.dropout.is_none_or(|d| d == 0.0)
            && m.continuing_subword_prefix.is_none()
            && m.end_of_word_suffix.is_none()
            && m.byte_fallback
            && !m.ignore_merges
            && json.added_tokens.iter().all(|t| {
                !t.normalized && !t.lstrip && !t.rstrip && !t.single_word && !t.content.is_empty()
            });
        if !shape_ok {
            return None;
        }
        let mut bytes = [NONE; 256];
        let mut is_byte = FxHashMap::default();
        for (b, slot) in bytes.iter_mut().enumerate() {
            if let Some(&id) = m.vocab.get(&format!("<0x{b:02X}>")) {
                *slot = id;
                is_byte.insert(id, b as u8);
            }
        }
        let mut ascii = [NONE; 128];
        let mut chars = FxHashMap::default();
        for (token, &id) in &m.vocab {
            let mut it = token.chars();
            if let (Some(c), None) = (it.next(), it.next()) {
                if c.is_ascii() {
                    ascii[c as usize] = id;
                } else {
                    chars.insert(c, id);
                }
            }
        }
        // The normaliser turns every space into `▁`, so a space looks up `▁`'s id.
        ascii[b' ' as usize] = m.vocab.get("\u{2581}").copied().unwrap_or(NONE);
        // Every character must be reachable without `<unk>` (Gemma's vocabulary has `\t` but no `<0x09>`): the
        // byte tokens of multi-byte characters must all exist, and an ASCII character lacking its byte token must
        // be a token itself. `tokenizers` emits a pending `<unk>` out of order around byte fallbacks, a quirk not
        // worth reproducing, so a vocabulary that could produce `<unk>` goes to the `tokenizers` engine instead.
        let reachable = (0..256).all(|b| bytes[b] != NONE || (b < 128 && ascii[b] != NONE));
        if !reachable {
            return None;
        }
        let mut merges = FxHashMap::with_capacity_and_hasher(m.merges.len(), Default::default());
        for (rank, merge) in m.merges.iter().enumerate() {
            let (a, b) = match merge {
                MergeJson::Pair(a, b) => (a.as_str(), b.as_str()),
                MergeJson::Legacy(line) => {
                    let mut parts = line.split(' ');
                    match (parts.next(), parts.next(), parts.next()) {
                        (Some(a), Some(b), None) => (a, b),
                        _ => return None,
                    }
                }
            };
            let (ia, ib) = (*m.vocab.get(a)?, *m.vocab.get(b)?);
            let merged = *m.vocab.get(&format!("{a}{b}"))?;
            // A repeated pair keeps its last rank, as in `tokenizers`.
            merges.insert(pack(ia, ib), pack(rank as u32, merged));
        }
        let mut added: Vec<(String, u32)> = json
            .added_tokens
            .iter()
            .map(|t| (t.content.clone(), t.id))
            .collect();
        added.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        let mut added_first_bytes = [false; 256];
        for (s, _) in &added {
            added_first_bytes[s.as_bytes()[0] as usize] = true;
        }
        let mut joinable_ascii = [0u128; 128];
        let mut joinable = FxHashSet::default();
        for token in m.vocab.keys() {
            let mut it = token.chars();
            let Some(mut prev) = it.next() else { continue };
            for c in it {
                match (ascii_slot(prev), ascii_slot(c)) {
                    (Some(a), Some(b)) => joinable_ascii[a] |= 1u128 << b,
                    _ => {
                        joinable.insert(pack(prev as u32, c as u32));
                    }
                }
                prev = c;
            }
        }
        static INSTANCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let instance = INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(Self {
            ascii,
            chars,
            bytes,
            merges,
            added,
            added_first_bytes,
            is_byte,
            joinable_ascii,
            joinable,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            instance,
        })
    }

    /// Appends the tokens of `text` to `out` (ids, and offsets when `offsets` is set).
    pub fn encode_into(&self, text: &str, out: &mut Encoding, offsets: bool) {
        LOCAL.with_borrow_mut(|local| {
            if local.instance != self.instance {
                local.cache.clear();
                local.instance = self.instance;
            }
            let mut start = 0;
            // Added tokens are matched leftmost-longest on the raw text, like `tokenizers`' AddedVocabulary.
            if !self.added.is_empty() {
                let b = text.as_bytes();
                let mut i = 0;
                while i < b.len() {
                    if self.added_first_bytes[b[i] as usize]
                        && let Some((s, id)) = self
                            .added
                            .iter()
                            .find(|(s, _)| b[i..].starts_with(s.as_bytes()))
                    {
                        self.segment(&text[start..i], start, out, offsets, local);
                        out.ids.push(*id);
                        if offsets {
                            out.offsets.push((i as u32, (i + s.len()) as u32));
                        }
                        i += s.len();
                        start = i;
                        continue;
                    }
                    i += 1;
                }
            }
            self.segment(&text[start..], start, out, offsets, local);
        });
    }

    /// Whether some token holds characters `a` and `b` side by side (after `' '` → `▁`).
    #[inline]
    fn joinable(&self, a: char, b: char) -> bool {
        match (ascii_slot(a), ascii_slot(b)) {
            (Some(x), Some(y)) => self.joinable_ascii[x] >> y & 1 == 1,
            _ => self
                .joinable
                .contains(&pack(normalize(a) as u32, normalize(b) as u32)),
        }
    }

    /// Encodes a text free of added tokens.
    ///
    /// A merge joins two adjacent symbols into a token, so every token the merges build contains, side by side,
    /// the two characters at the seam. Where two adjacent characters appear side by side in no token at all, no
    /// merge can ever cross between them: the BPE of the text is the BPE of the pieces on either side, put
    /// together. Gemma's 256k tokens hold only about 28k distinct adjacent pairs (no token has a `▁` after another
    /// character, for one), so text falls into word-sized chunks. Each chunk's BPE is short, and repeated chunks
    /// (words) come from a per-thread cache.
    fn segment(
        &self,
        text: &str,
        base: usize,
        out: &mut Encoding,
        offsets: bool,
        local: &mut Local,
    ) {
        let mut chunk_start = 0;
        let mut prev: Option<char> = None;
        for (i, c) in text.char_indices() {
            if let Some(p) = prev
                && !self.joinable(p, c)
            {
                self.chunk(
                    &text[chunk_start..i],
                    base + chunk_start,
                    out,
                    offsets,
                    local,
                );
                chunk_start = i;
            }
            prev = Some(c);
        }
        if chunk_start < text.len() {
            self.chunk(
                &text[chunk_start..],
                base + chunk_start,
                out,
                offsets,
                local,
            );
        }
    }

    fn chunk(
        &self,
        chunk: &str,
        base: usize,
        out: &mut Encoding,
        offsets: bool,
        local: &mut Local,
    ) {
        let Local { cache, scratch, .. } = local;
        let tokens: &[(u32, u32)] = match cache.get(chunk) {
            Some(t) => t,
            None => {
                self.bpe(chunk, scratch);
                if cache.len() < self.cache_capacity {
                    cache.insert(chunk.into(), scratch.tokens.as_slice().into());
                }
                &scratch.tokens
            }
        };
        let mut at = base as u32;
        for &(id, len) in tokens {
            out.ids.push(id);
            if offsets {
                out.offsets.push((at, at + len));
            }
            at += len;
        }
    }

    /// BPE of one chunk into `scratch.tokens` as `(id, byte length in the input)`: lowest merge rank first,
    /// leftmost on ties, exactly as `tokenizers`' `Word::merge_all`.
    fn bpe(&self, word: &str, scratch: &mut Scratch) {
        let syms = &mut scratch.symbols;
        syms.clear();
        for (i, c) in word.char_indices() {
            let id = if c.is_ascii() {
                self.ascii[c as usize]
            } else {
                self.chars.get(&c).copied().unwrap_or(NONE)
            };
            let start = i as u32;
            if id != NONE {
                syms.push(Symbol {
                    id,
                    start,
                    end: start + c.len_utf8() as u32,
                });
            } else {
                let mut buf = [0u8; 4];
                for (k, byte) in c.encode_utf8(&mut buf).bytes().enumerate() {
                    let s = start + k as u32;
                    syms.push(Symbol {
                        id: self.bytes[byte as usize],
                        start: s,
                        end: s + 1,
                    });
                }
            }
        }
        let n = syms.len();
        if n <= SMALL_CHUNK {
            self.merge_small(syms, &mut scratch.ranks);
            scratch.tokens.clear();
            scratch
                .tokens
                .extend(syms.iter().map(|s| (s.id, s.end - s.start)));
            return;
        }
        // Doubly linked list over `syms`; a merged-away symbol gets `id = NONE`.
        let links = &mut scratch.links;
        links.clear();
        links.extend((0..n).map(|i| (i as u32).wrapping_sub(1)..(i as u32 + 1)));
        let heap = &mut scratch.heap;
        heap.clear();
        for i in 0..n.saturating_sub(1) {
            if let Some(&m) = self.merges.get(&pack(syms[i].id, syms[i + 1].id)) {
                heap.push(Reverse(pack(high(m), i as u32)));
            }
        }
        while let Some(Reverse(top)) = heap.pop() {
            let (rank, pos) = (high(top), low(top) as usize);
            let left = syms[pos];
            if left.id == NONE {
                continue;
            }
            let next = links[pos].end as usize;
            if next >= n {
                continue;
            }
            // Entries go stale when a neighbour merged; the pair must still be the one this entry was for.
            let Some(&m) = self.merges.get(&pack(left.id, syms[next].id)) else {
                continue;
            };
            if high(m) != rank {
                continue;
            }
            syms[pos] = Symbol {
                id: low(m),
                start: left.start,
                end: syms[next].end,
            };
            syms[next].id = NONE;
            let after = links[next].end;
            links[pos].end = after;
            if (after as usize) < n {
                links[after as usize].start = pos as u32;
            }
            let prev = links[pos].start;
            if prev != u32::MAX
                && let Some(&m) = self.merges.get(&pack(syms[prev as usize].id, syms[pos].id))
            {
                heap.push(Reverse(pack(high(m), prev)));
            }
            if (after as usize) < n
                && let Some(&m) = self
                    .merges
                    .get(&pack(syms[pos].id, syms[after as usize].id))
            {
                heap.push(Reverse(pack(high(m), pos as u32)));
            }
        }
        scratch.tokens.clear();
        scratch.tokens.extend(
            syms.iter()
                .filter(|s| s.id != NONE)
                .map(|s| (s.id, s.end - s.start)),
        );
    }

    /// The merge loop for a short chunk, where a heap costs more than it saves: keep the merge of every adjacent
    /// pair in an array and apply the leftmost lowest-ranked one until none is left. Same order as the heap.
    fn merge_small(&self, syms: &mut Vec<Symbol>, ranks: &mut Vec<u64>) {
        let merge_of = |a: &Symbol, b: &Symbol| {
            self.merges
                .get(&pack(a.id, b.id))
                .copied()
                .unwrap_or(u64::MAX)
        };
        ranks.clear();
        ranks.extend(syms.windows(2).map(|w| merge_of(&w[0], &w[1])));
        loop {
            // `rank << 32 | id`: one rank is one pair, so equal values are the same merge and `<` keeps the leftmost.
            let mut best = u64::MAX;
            let mut at = usize::MAX;
            for (i, &r) in ranks.iter().enumerate() {
                if r < best {
                    best = r;
                    at = i;
                }
            }
            if at == usize::MAX {
                return;
            }
            syms[at] = Symbol {
                id: low(best),
                start: syms[at].start,
                end: syms[at + 1].end,
            };
            syms.remove(at + 1);
            ranks.remove(at);
            if at < ranks.len() {
                ranks[at] = merge_of(&syms[at], &syms[at + 1]);
            }
            if at > 0 {
                ranks[at - 1] = merge_of(&syms[at - 1], &syms[at]);
            }
        }
    }

    /// The text of tokens `range` of `enc` (which encodes `text`), as Hugging Face's `decode` gives it:
    /// - its decoder turns every `▁` back into a space, so a literal `▁` in the input comes back as `' '`;
    /// - its ByteFallback decoder turns a run of byte tokens that is not valid UTF-8 (a character cut at the edge of
    ///   the range) into one `U+FFFD` per byte of the run.
    fn decode_span(&self, text: &str, enc: &Encoding, range: std::ops::Range<usize>) -> String {
        let mut out = String::new();
        let mut run: Vec<u8> = Vec::new();
        let flush = |run: &mut Vec<u8>, out: &mut String| {
            match std::str::from_utf8(run) {
                Ok(s) => out.push_str(s),
                Err(_) => out.extend(std::iter::repeat_n('\u{FFFD}', run.len())),
            }
            run.clear();
        };
        for k in range {
            let (s, e) = enc.offsets[k];
            if let Some(&b) = self.is_byte.get(&enc.ids[k]) {
                run.push(b);
                continue;
            }
            if !run.is_empty() {
                flush(&mut run, &mut out);
            }
            let piece = &text[s as usize..e as usize];
            if piece.contains(SPACE_MARK) {
                out.extend(piece.chars().map(|c| if c == SPACE_MARK { ' ' } else { c }));
            } else {
                out.push_str(piece);
            }
        }
        if !run.is_empty() {
            flush(&mut run, &mut out);
        }
        out
    }
}

#[derive(Clone, Copy)]
struct Symbol {
    id: u32,
    start: u32,
    end: u32,
}

/// Reused buffers: `links[i]` is `prev..next` of symbol `i` (`u32::MAX` for none before).
#[derive(Default)]
struct Scratch {
    symbols: Vec<Symbol>,
    links: Vec<std::ops::Range<u32>>,
    heap: BinaryHeap<Reverse<u64>>,
    tokens: Vec<(u32, u32)>,
    ranks: Vec<u64>,
}

/// Chunks of at most this many symbols merge with [`GemmaBpe::merge_small`].
const SMALL_CHUNK: usize = 48;

/// Chunks remembered per thread by default (a few MiB).
pub const DEFAULT_CACHE_CAPACITY: usize = 1 << 17;

/// Per-thread state of the engine: the chunk cache of one engine instance, and scratch buffers.
#[derive(Default)]
struct Local {
    instance: u64,
    cache: FxHashMap<Box<str>, Box<[(u32, u32)]>>,
    scratch: Scratch,
}

thread_local! {
    static LOCAL: std::cell::RefCell<Local> = std::cell::RefCell::new(Local::default());
}

/// `▁` for a space (the normaliser's job), the character itself otherwise.
#[inline]
fn normalize(c: char) -> char {
    if c == ' ' { SPACE_MARK } else { c }
}

/// Slot in the ASCII pair table: the character for ASCII, and the space's slot for `▁` (a space never reaches the
/// tokens as itself).
#[inline]
fn ascii_slot(c: char) -> Option<usize> {
    if c == SPACE_MARK {
        Some(b' ' as usize)
    } else if c.is_ascii() {
        Some(c as usize)
    } else {
        None
    }
}

#[inline]
fn pack(hi: u32, lo: u32) -> u64 {
    (u64::from(hi) << 32) | u64::from(lo)
}
#[inline]
fn high(x: u64) -> u32 {
    (x >> 32) as u32
}
#[inline]
fn low(x: u64) -> u32 {
    x as u32
}

/// Where `scripts/setup.sh` puts the Gemma tokenizer, relative to the repository root.
pub const DEFAULT_TOKENIZER: &str = ".cache/tokenizer-gemma/tokenizer.json";

/// The tokenizer to use when none is given: `$ARENA_JUDGE_TOKENIZER`, else [`DEFAULT_TOKENIZER`] under the current
/// directory or one of its parents, else under the repository this binary was built from.
#[cfg(feature = "native")]
pub fn default_tokenizer_path() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("ARENA_JUDGE_TOKENIZER") {
        return Some(p.into());
    }
    let cwd = std::env::current_dir().ok();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf);
    cwd.iter()
        .flat_map(|d| {
            d.ancestors()
                .map(std::path::Path::to_path_buf)
                .collect::<Vec<_>>()
        })
        .chain(repo)
        .map(|d| d.join(DEFAULT_TOKENIZER))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy SentencePiece-style tokenizer whose merges do cross a `▁` (`a▁b`), with a byte-fallback-only
    /// character and an added token.
    fn toy() -> Vec<u8> {
        let mut vocab: Vec<String> = vec![
            "<pad>".into(),
            "<eos>".into(),
            "<bos>".into(),
            "<unk>".into(),
        ];
        vocab.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        for t in [
            "a",
            "b",
            "c",
            "\u{2581}",
            "a\u{2581}",
            "a\u{2581}b",
            "bc",
            "cc",
            "ccc",
            "\u{2581}\u{2581}",
            "\t",
            "é",
        ] {
            vocab.push(t.into());
        }
        let vocab: serde_json::Map<String, serde_json::Value> = vocab
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), serde_json::json!(i)))
            .collect();
        let json = serde_json::json!({
            "added_tokens": [
                {"id": 0, "content": "<pad>", "special": true, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false},
                {"id": 1, "content": "<eos>", "special": true, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false},
                {"id": 2, "content": "<bos>", "special": true, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false},
                {"id": 3, "content": "<unk>", "special": true, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false},
            ],
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                      "vocab": vocab,
                      "merges": ["c c", "a \u{2581}", "a\u{2581} b", "b c", "cc c", "\u{2581} \u{2581}"]}
        });
        serde_json::to_vec(&json).unwrap()
    }

    #[test]
    fn merges_across_a_space_mark_are_kept_and_match_tokenizers() {
        let bytes = toy();
        let fast = Tokenizer::from_json_bytes("toy", &bytes, EnginePreference::Fastest).unwrap();
        let mut uncached =
            Tokenizer::from_json_bytes("toy", &bytes, EnginePreference::Fastest).unwrap();
        uncached.set_cache_capacity(0);
        let hf = Tokenizer::from_json_bytes("toy", &bytes, EnginePreference::HuggingFace).unwrap();
        assert_eq!(fast.engine_name(), "gemma-bpe");
        assert_eq!(hf.engine_name(), "huggingface-tokenizers");
        for text in [
            "a b",
            "a bc",
            "ccccc b a b",
            "x a  b\té<eos>a b",
            "🙂a b",
            "ba b a",
            "  ",
            "",
        ] {
            let expected = hf.encode(text).unwrap();
            assert_eq!(fast.encode(text).unwrap(), expected, "{text:?}");
            assert_eq!(fast.encode(text).unwrap(), expected, "{text:?} (cached)");
            assert_eq!(
                uncached.encode(text).unwrap(),
                expected,
                "{text:?} (no cache)"
            );
        }
        // `a▁b` is one token: the chunking must not cut between `a` and `▁`.
        assert_eq!(fast.encode("a b").unwrap().len(), 1);
    }

    #[test]
    fn unsupported_shapes_fall_back_to_tokenizers() {
        let mut json: serde_json::Value = serde_json::from_slice(&toy()).unwrap();
        json["pre_tokenizer"] = serde_json::json!({"type": "Whitespace"});
        let t = Tokenizer::from_json_bytes(
            "toy",
            &serde_json::to_vec(&json).unwrap(),
            EnginePreference::Fastest,
        )
        .unwrap();
        assert_eq!(t.engine_name(), "huggingface-tokenizers");
    }
}
