//! Weights that stay quantized on the device: int8 and 4-bit values in blocks of 32 along a row (PyTorch's `in`
//! dimension), one f16 scale per block, packed into little-endian u32 words.
//!
//! The packing is burn's own (`QuantStore::PackedU32(0)`: value `i` of a word sits at bits `bits·i`, two's
//! complement), so a packed tensor goes to the GPU as it is stored and burn's matmul dequantizes it inside the
//! kernel: gemma-2-2b's projections take 1.3 GB in q4 where f32 would take 10 GB. The token embedding, which is
//! only ever indexed, is unpacked row by row with integer operations ([`PackedEmbedding`]).
//!
//! Two file forms (see [`super::weights`]):
//! - **int8** (`trainer export --int8`): `key` as I8 `[rows, cols]`, `key_scale` one f16 per row. A row's scale is
//!   repeated for each of its blocks, which is exact.
//! - **q4** (`trainer export --q4`): `key` as U32 `[rows, cols / 8]` holding the packed words, `key_scale` F16
//!   `[rows, cols / 32]`. Symmetric: values -7..=7, scale `max|w| / 7` of the block, rounded to f16 first.

use burn::tensor::quantization::{QuantScheme, QuantStore, QuantValue, ScaleDtype};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use half::f16;
use safetensors::Dtype;

use super::weights::RawTensor;

/// Values per scale.
pub const BLOCK: usize = 32;

/// The stored width of a packed value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bits {
    Q8,
    Q4,
}

impl Bits {
    pub fn bits(self) -> usize {
        match self {
            Bits::Q8 => 8,
            Bits::Q4 => 4,
        }
    }

    /// The largest magnitude a value takes (symmetric range).
    pub fn max(self) -> f32 {
        match self {
            Bits::Q8 => 127.0,
            Bits::Q4 => 7.0,
        }
    }

    /// Values per u32 word.
    pub fn per_word(self) -> usize {
        32 / self.bits()
    }
}

/// A `[rows, cols]` matrix (PyTorch layout) of packed values with a scale per block of [`BLOCK`] along each row.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    pub bits: Bits,
    pub rows: usize,
    pub cols: usize,
    /// `rows × cols / per_word` little-endian u32 words, row-major, as bytes: the file's bytes and the tensor's
    /// are the same, so a large table moves from download to tensor without a copy.
    pub words: Vec<u8>,
    /// `rows × cols / BLOCK` scales, row-major.
    pub scales: Vec<f16>,
}

/// Whether a row of `cols` values splits into whole blocks (and so whole words): every projection of a real
/// Gemma-2 does; a tensor that does not stays unpacked.
pub fn packable(cols: usize) -> bool {
    cols > 0 && cols.is_multiple_of(BLOCK)
}

impl Packed {
    /// Quantizes `values` (`[rows, cols]`, row-major) to 4 bits; `None` unless [`packable`].
    pub fn quantize_q4(values: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if !packable(cols) || values.len() != rows * cols {
            return None;
        }
        let bits = Bits::Q4;
        let mut words = Vec::with_capacity(values.len() / 2);
        let mut scales = Vec::with_capacity(values.len() / BLOCK);
        for block in values.chunks(BLOCK) {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            // The scale is rounded to f16 before dividing, so the stored scale is the one the values were
            // divided by; rounded up, so the block's largest value lands on ±7 rather than past it.
            let scale = round_up_f16(if max > 0.0 { max / bits.max() } else { 1.0 });
            scales.push(scale);
            let s = scale.to_f32();
            for chunk in block.chunks(bits.per_word()) {
                let q = chunk
                    .iter()
                    .map(|v| (v / s).round().clamp(-bits.max(), bits.max()) as i8);
                words.extend_from_slice(&pack(q, bits).to_le_bytes());
            }
        }
        Some(Self {
            bits,
            rows,
            cols,
            words,
            scales,
        })
    }

    /// int8 values with one scale per row (the int8 file form) as blocks; `None` unless [`packable`].
    pub fn from_int8_rows(
        values: &[i8],
        row_scales: &[f16],
        rows: usize,
        cols: usize,
    ) -> Option<Self> {
        if !packable(cols) || values.len() != rows * cols || row_scales.len() != rows {
            return None;
        }
        let bits = Bits::Q8;
        // Four int8 values in a little-endian word are the four bytes as they are.
        let words = values.iter().map(|&v| v as u8).collect();
        let scales = row_scales
            .iter()
            .flat_map(|&s| std::iter::repeat_n(s, cols / BLOCK))
            .collect();
        Some(Self {
            bits,
            rows,
            cols,
            words,
            scales,
        })
    }

    /// Which packed form a stored `[rows, cols]` tensor of `dtype` with `scale` is: int8 rows with one f16 scale
    /// per row, or q4 words with one f16 scale per block. `None` for anything else (it is widened instead).
    pub fn stored_form(dtype: Dtype, scale: &RawTensor, rows: usize, cols: usize) -> Option<Bits> {
        if !packable(cols) || scale.dtype != Dtype::F16 {
            return None;
        }
        match dtype {
            Dtype::I8 if scale.shape == [rows] => Some(Bits::Q8),
            Dtype::U32 if scale.shape == [rows, cols / BLOCK] => Some(Bits::Q4),
            _ => None,
        }
    }

    /// The packed form of stored `values` (their bytes, moved: no copy) with `scale`, as [`stored_form`] decided.
    ///
    /// [`stored_form`]: Self::stored_form
    pub fn from_stored(
        bits: Bits,
        values: Vec<u8>,
        scale: &RawTensor,
        rows: usize,
        cols: usize,
    ) -> Self {
        let halves = scale
            .bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]));
        let scales = match bits {
            // A row's scale for each of its blocks.
            Bits::Q8 => halves
                .flat_map(|s| std::iter::repeat_n(s, cols / BLOCK))
                .collect(),
            Bits::Q4 => halves.collect(),
        };
        Self {
            bits,
            rows,
            cols,
            words: values,
            scales,
        }
    }

    /// Value `i` (row-major) as stored, before scaling.
    pub fn value(&self, i: usize) -> i8 {
        let per = self.bits.per_word();
        let w = i / per * 4;
        let word = u32::from_le_bytes([
            self.words[w],
            self.words[w + 1],
            self.words[w + 2],
            self.words[w + 3],
        ]);
        unpack(word, i % per, self.bits)
    }

    /// Every value times its block's scale, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.rows * self.cols)
            .map(|i| f32::from(self.value(i)) * self.scales[i / BLOCK].to_f32())
            .collect()
    }

    /// burn's scheme for this layout, with scales held as `scales` (f16 as stored, or f32 where the device has
    /// no f16).
    pub fn scheme(&self, scales: ScaleDtype) -> QuantScheme {
        QuantScheme::default()
            .with_value(match self.bits {
                Bits::Q8 => QuantValue::Q8S,
                Bits::Q4 => QuantValue::Q4S,
            })
            .with_store(QuantStore::PackedU32(0))
            .per_block([BLOCK as u8], scales)
    }

    /// A quantized `[rows, cols]` tensor: the words, then the scales (burn's byte layout for a packed tensor).
    ///
    /// **Scales on a device without f16.** The kernel reads scales in the scheme's dtype; a WebGPU adapter
    /// without `shader-f16` (SwiftShader, many browsers) reads f16 scales as garbage (P(A) came out 0.000 where
    /// it should be 0.55), so there they are widened to f32, exactly, for 4 bytes per 32 values instead of 2.
    pub fn tensor_data(self, device_has_f16: bool) -> TensorData {
        let dtype = if device_has_f16 {
            ScaleDtype::F16
        } else {
            ScaleDtype::F32
        };
        let (shape, scheme) = ([self.rows, self.cols], self.scheme(dtype));
        let mut bytes = self.words;
        bytes.reserve_exact(self.scales.len() * 4 + 2);
        for s in &self.scales {
            if device_has_f16 {
                bytes.extend_from_slice(&s.to_le_bytes());
            } else {
                bytes.extend_from_slice(&s.to_f32().to_le_bytes());
            }
        }
        // Parameters are padded to a 4-byte boundary.
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        TensorData::from_bytes_vec(bytes, shape, DType::QFloat(scheme))
    }

    /// Bytes the values and scales of a packed `[rows, cols]` tensor take on `device`: on a GPU as packed, with
    /// f16 scales where it has f16 (see [`tensor_data`]). burn's CPU backend (the browser's CPU fallback) unpacks
    /// a packed tensor as it takes it, to one byte per value and f32 scales: q4 takes twice its file size there.
    ///
    /// [`tensor_data`]: Self::tensor_data
    pub fn device_bytes(rows: usize, cols: usize, bits: Bits, device: &Device) -> u64 {
        let n = rows as u64 * cols as u64;
        if !super::placement::is_gpu(device) {
            return n + n / BLOCK as u64 * 4;
        }
        let f16 = device.supports_dtype(burn::tensor::FloatDType::F16);
        n * bits.bits() as u64 / 8 + n / BLOCK as u64 * if f16 { 2 } else { 4 }
    }
}

fn round_up_f16(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() < x {
        f16::from_bits(h.to_bits() + 1)
    } else {
        h
    }
}

fn pack(values: impl Iterator<Item = i8>, bits: Bits) -> u32 {
    let mask = (1u32 << bits.bits()) - 1;
    values.enumerate().fold(0, |w, (i, v)| {
        w | ((v as u8 as u32) & mask) << (i * bits.bits())
    })
}

fn unpack(word: u32, i: usize, bits: Bits) -> i8 {
    let b = bits.bits();
    let raw = ((word >> (i * b)) & ((1 << b) - 1)) as u8;
    // Sign-extend the field.
    ((raw << (8 - b)) as i8) >> (8 - b)
}

/// The largest piece of a table's words uploaded at once.
const UPLOAD_BYTES: usize = 64 << 20;

/// `[rows, per_row]` little-endian words as an i32 tensor on `device`. The words' bytes are i32 values as they are:
/// no conversion. A table larger than [`UPLOAD_BYTES`] goes up in pieces, from its end, written into a zeroed
/// tensor: each piece is cut off the words and their memory released before the next, so the words and the pieces
/// together never take more than the table. In the browser an upload's bytes are held a second time in wasm
/// memory (where exactly is not traced): gemma-2-2b's 590 MB int8 table uploaded whole peaked at 1,565 MB of wasm
/// memory, over the 1.5 GB the page may use; in pieces released as they go, at 1,240 MB (measured).
fn upload_words(words: Vec<u8>, rows: usize, per_row: usize, device: &Device) -> Tensor<2, Int> {
    // burn's CPU backend takes the bytes as they are (no copy), where pieces would add a zeroed table.
    let piece = match super::placement::is_gpu(device) {
        true => UPLOAD_BYTES,
        false => usize::MAX,
    };
    upload_words_in(words, rows, per_row, device, piece)
}

fn upload_words_in(
    mut words: Vec<u8>,
    rows: usize,
    per_row: usize,
    device: &Device,
    piece_bytes: usize,
) -> Tensor<2, Int> {
    let row_bytes = per_row * 4;
    let piece_rows = (piece_bytes / row_bytes.max(1)).max(1);
    if rows <= piece_rows {
        return Tensor::from_data(
            TensorData::from_bytes_vec(words, [rows, per_row], DType::I32),
            (device, DType::I32),
        );
    }
    let mut out = Tensor::<2, Int>::zeros([rows, per_row], (device, DType::I32));
    let mut end = rows;
    while end > 0 {
        let start = end.saturating_sub(piece_rows);
        let piece = words.split_off(start * row_bytes);
        words.shrink_to_fit();
        let piece = Tensor::from_data(
            TensorData::from_bytes_vec(piece, [end - start, per_row], DType::I32),
            (device, DType::I32),
        );
        out = out.slice_assign([start..end, 0..per_row], piece);
        end = start;
    }
    out
}

/// A token embedding kept packed: `[vocab, hidden]` values as integer words and f32 block scales, on the compute
/// device when they fit one binding, else on the host (see [`super::placement`]). Only the looked-up rows are
/// unpacked.
#[derive(Debug, Clone)]
pub struct PackedEmbedding {
    /// `[vocab, hidden / per_word]`, the u32 words as i32.
    words: Tensor<2, Int>,
    /// `[vocab, hidden / BLOCK]`.
    scales: Tensor<2>,
    bits: Bits,
    hidden: usize,
}

impl PackedEmbedding {
    pub fn new(table: Packed, device: &Device) -> Self {
        let per = table.bits.per_word();
        let scales: Vec<f32> = table.scales.iter().map(|s| s.to_f32()).collect();
        Self {
            words: upload_words(table.words, table.rows, table.cols / per, device),
            scales: Tensor::from_data(
                TensorData::new(scales, [table.rows, table.cols / BLOCK]),
                device,
            ),
            bits: table.bits,
            hidden: table.cols,
        }
    }

    /// The bytes a table of `vocab × hidden` takes in `bits` (words, and f32 scales).
    pub fn bytes(vocab: usize, hidden: usize, bits: Bits) -> u64 {
        let (v, h) = (vocab as u64, hidden as u64);
        v * h * bits.bits() as u64 / 8 + v * (h / BLOCK as u64) * 4
    }

    pub fn vocab_size(&self) -> usize {
        self.words.dims()[0]
    }

    pub fn device(&self) -> Device {
        self.words.device()
    }

    /// # Shapes
    /// `ids`: `[batch, seq]` on [`device`](Self::device) → `[batch, seq, hidden]` f32
    pub fn lookup(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [batch, seq] = ids.dims();
        let n = batch * seq;
        let ids = ids.reshape([n]);
        let words = self.words.clone().select(0, ids.clone()); // [n, hidden / per_word]
        let b = self.bits.bits();
        let mask = (1i64 << b) - 1;
        // Field i of each word, as an unsigned field, then sign-extended: `f - 2^b` where the top bit is set.
        let fields: Vec<Tensor<2, Int>> = (0..self.bits.per_word())
            .map(|i| {
                let f = words
                    .clone()
                    .bitwise_right_shift_scalar((i * b) as i64)
                    .bitwise_and_scalar(mask);
                f.clone()
                    - f.bitwise_right_shift_scalar(b as i64 - 1)
                        .mul_scalar(1i64 << b)
            })
            .collect();
        let values = Tensor::stack::<3>(fields, 2) // [n, words, per_word]: word order, then field order
            .reshape([n, self.hidden / BLOCK, BLOCK])
            .float();
        let scales = self
            .scales
            .clone()
            .select(0, ids)
            .reshape([n, self.hidden / BLOCK, 1]);
        (values * scales).reshape([batch, seq, self.hidden])
    }
}

#[cfg(all(test, feature = "native"))]
mod tests {
    use super::*;

    fn values(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i / BLOCK % 5) as f32))
            .collect()
    }

    #[test]
    fn q4_round_trips_within_half_a_step_of_its_block() {
        let (rows, cols) = (3, 64);
        let v = values(rows, cols);
        let p = Packed::quantize_q4(&v, rows, cols).unwrap();
        assert_eq!(p.words.len(), rows * cols / 2);
        assert_eq!(p.scales.len(), rows * cols / BLOCK);
        let back = p.dequantize();
        for (i, (a, b)) in v.iter().zip(&back).enumerate() {
            let step = p.scales[i / BLOCK].to_f32();
            assert!(
                (a - b).abs() <= step / 2.0 + 1e-6,
                "{i}: {a} vs {b} (step {step})"
            );
        }
        // Each block's largest value is representable: its code is ±7.
        for (b, block) in v.chunks(BLOCK).enumerate() {
            let at = (0..BLOCK)
                .max_by(|&i, &j| block[i].abs().total_cmp(&block[j].abs()))
                .unwrap();
            assert_eq!(p.value(b * BLOCK + at).abs(), 7);
        }
        assert!(
            Packed::quantize_q4(&v[..3 * 48], 3, 48).is_none(),
            "48 is not whole blocks"
        );
    }

    #[test]
    fn int8_rows_become_blocks_exactly() {
        let (rows, cols) = (2, 64);
        let q: Vec<i8> = (0..rows * cols)
            .map(|i| (i as i32 * 37 % 255 - 127) as i8)
            .collect();
        let s = [f16::from_f32(0.5), f16::from_f32(0.25)];
        let p = Packed::from_int8_rows(&q, &s, rows, cols).unwrap();
        let d = p.dequantize();
        for i in 0..rows * cols {
            assert_eq!(p.value(i), q[i]);
            assert_eq!(d[i], f32::from(q[i]) * s[i / cols].to_f32());
        }
    }

    #[test]
    fn the_cpu_backend_holds_a_byte_per_value_as_counted() {
        // burn's CPU backend unpacks q4 to one byte per value (f32 scales): the page's estimate must say so.
        let (rows, cols) = (4, 64);
        let p = Packed::quantize_q4(&values(rows, cols), rows, cols).unwrap();
        let device = Device::flex();
        let held = Tensor::<2>::from_data(p.tensor_data(false), &device)
            .into_data()
            .as_bytes()
            .len() as u64;
        assert_eq!(held, Packed::device_bytes(rows, cols, Bits::Q4, &device));
    }

    #[test]
    fn a_table_uploaded_in_pieces_equals_one_uploaded_whole() {
        // 7 rows of 3 words in pieces of 2 rows (the last piece shorter), on the CPU and on wgpu.
        let words: Vec<u8> = (0..7 * 3 * 4).map(|i| (i * 7 % 256) as u8).collect();
        for device in [Device::flex(), Device::wgpu(Default::default())] {
            let whole = upload_words_in(words.clone(), 7, 3, &device, usize::MAX);
            let pieces = upload_words_in(words.clone(), 7, 3, &device, 2 * 3 * 4);
            assert_eq!(
                pieces.to_data().try_to_vec::<i32>().unwrap(),
                whole.to_data().try_to_vec::<i32>().unwrap()
            );
        }
    }

    #[test]
    fn burn_reads_our_packing_and_the_embedding_unpacks_it() {
        let device = Device::flex();
        let (rows, cols) = (5, 64);
        for p in [
            Packed::quantize_q4(&values(rows, cols), rows, cols).unwrap(),
            Packed::from_int8_rows(
                &(0..rows * cols)
                    .map(|i| (i % 255) as i8)
                    .collect::<Vec<_>>(),
                &[f16::from_f32(0.01); 5],
                rows,
                cols,
            )
            .unwrap(),
        ] {
            let expected = p.dequantize();
            for f16 in [true, false] {
                let t = Tensor::<2>::from_data(p.clone().tensor_data(f16), &device);
                assert_eq!(
                    t.dequantize().to_data().try_to_vec::<f32>().unwrap(),
                    expected
                );
            }
            let table = PackedEmbedding::new(p, &device);
            let ids =
                Tensor::<2, Int>::from_data(TensorData::new(vec![4i64, 0, 2, 4], [2, 2]), &device);
            let rows_out = table.lookup(ids).to_data().try_to_vec::<f32>().unwrap();
            for (k, r) in [4usize, 0, 2, 4].iter().enumerate() {
                assert_eq!(
                    rows_out[k * cols..(k + 1) * cols],
                    expected[r * cols..(r + 1) * cols]
                );
            }
        }
    }
}
