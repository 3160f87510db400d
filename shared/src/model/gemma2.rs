//! Gemma-2 (Gemma Team, "Gemma 2: Improving Open Language Models at a Practical Size", 2024) as a sequence
//! classifier, the way transformers' `Gemma2ForSequenceClassification` computes it.
//!
//! Field names are the Hugging Face checkpoint keys (`model.layers.3.self_attn.q_proj.weight` is
//! `model.layers[3].self_attn.q_proj.weight`). The Gemma-2 details, each named where it happens:
//! - **(1 + w) RMSNorm**: norm weights are stored as offsets from one;
//! - **embedding scale**: embeddings are multiplied by `sqrt(hidden_size)`, rounded to the activation dtype;
//! - **sandwich norms**: a norm before *and after* both attention and the feed-forward block;
//! - **GQA**: `num_key_value_heads` K/V heads, each shared by a group of query heads;
//! - **query_pre_attn_scalar**: scores are scaled by `query_pre_attn_scalar^-0.5`, not `head_dim^-0.5`;
//! - **attention soft-capping**: `cap * tanh(score / cap)` before the mask;
//! - **alternating sliding window**: local layers (even ones, by default) see only the last `sliding_window` tokens;
//! - **GeGLU with tanh GELU**: `down(gelu_tanh(gate(x)) * up(x))`;
//! - **RoPE in halves**: the rotation pairs dimension `i` with `i + head_dim/2` (`rotate_half`), not neighbours;
//! - **[out, in] Linear**: checkpoints store PyTorch's `[out, in]`; burn's `Linear` holds `[in, out]`.
//!
//! The classifier pools the last non-padding token of each row and applies `score` (no bias, no soft-cap).

use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, DType, Device, FloatDType, Int, Tensor, TensorData};

use super::config::{Gemma2Config, LayerType};
use super::lora::Projection;
use super::placement::Placement;

/// RMSNorm with Gemma's **(1 + w)** scale: the weight is an offset from one, so a zero-initialised norm is the
/// identity scale. Computed in f32 whatever the activation dtype, as transformers does.
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    #[module(skip)]
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor<1>, eps: f64) -> Self {
        Self {
            weight: Param::from_tensor(weight),
            eps,
        }
    }

    /// # Shapes
    /// `x`: `[batch, seq, hidden]` → `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let dtype = x.dtype();
        let x = x.cast(FloatDType::F32);
        let inv_rms = x
            .clone()
            .square()
            .mean_dim(2)
            .add_scalar(self.eps)
            .sqrt()
            .recip(); // [batch, seq, 1]
        // `1 + w` is computed on the weight broadcast to the activations' shape, not on the `[hidden]` weight
        // alone: the same f32 additions, but now element-wise work of one shape with the products, which fusion
        // runs in their kernel. On the weight alone it was a kernel of its own in every norm of every pass.
        let [batch, seq, hidden] = x.dims();
        let scale = self
            .weight
            .val()
            .unsqueeze::<3>()
            .expand([batch, seq, hidden])
            .cast(FloatDType::F32)
            .add_scalar(1.0);
        (x * inv_rms * scale).cast(dtype)
    }
}

/// Cosine and sine tables of rotary embeddings for positions `0..seq`, kept outside the model and passed to
/// `forward`. Computed in f32 exactly as transformers does (inverse frequencies in f32, then `pos * inv_freq`).
#[derive(Debug, Clone)]
pub struct Rope {
    /// `[seq, head_dim]`, the halves repeated: `cos(cat(freqs, freqs))`.
    pub cos: Tensor<2>,
    /// `[seq, head_dim]`, with `rotate_half`'s sign folded in: `cat(-sin(freqs), sin(freqs))`.
    pub sin: Tensor<2>,
    /// Two `[head_dim]` orders of a head's indices, for [`apply_t`](Self::apply_t) without autodiff: `0..head_dim`,
    /// and the halves swapped, `half..head_dim` then `0..half`.
    pub order: [Tensor<1, Int>; 2],
}

impl Rope {
    pub fn new(seq: usize, head_dim: usize, theta: f64, device: &Device) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(seq * head_dim);
        let mut sin = Vec::with_capacity(seq * head_dim);
        for pos in 0..seq {
            for k in 0..head_dim {
                let angle = pos as f32 * inv_freq[k % half];
                cos.push(angle.cos());
                sin.push(if k < half { -angle.sin() } else { angle.sin() });
            }
        }
        let index = |range: Vec<usize>| {
            let range: Vec<i64> = range.into_iter().map(|i| i as i64).collect();
            Tensor::from_data(TensorData::new(range, [head_dim]), device)
        };
        let order = [index((0..head_dim).collect()), index((half..head_dim).chain(0..half).collect())];
        Self {
            cos: Tensor::from_data(TensorData::new(cos, [seq, head_dim]), device),
            sin: Tensor::from_data(TensorData::new(sin, [seq, head_dim]), device),
            order,
        }
    }

    /// The tables rounded to the activation dtype once, as transformers does (`cos.to(x.dtype)`), so that each
    /// of the two calls per layer does not cast them again: on a GPU every cast is a kernel launch.
    pub fn cast(self, dtype: DType) -> Self {
        Self {
            cos: self.cos.cast(dtype),
            sin: self.sin.cast(dtype),
            order: self.order,
        }
    }

    /// `[cos, sin]` for positions `0..seq` in `dtype`. Tables made for this pass are already `seq` long and in
    /// the activations' dtype: nothing to launch for them then.
    fn tables(&self, seq: usize, dtype: DType) -> [Tensor<2>; 2] {
        [&self.cos, &self.sin].map(|t| {
            let t = if t.dims()[0] == seq {
                t.clone()
            } else {
                t.clone().narrow(0, 0, seq)
            };
            if t.dtype() == dtype { t } else { t.cast(dtype) }
        })
    }

    /// **RoPE in halves**: `x * cos + rotate_half(x) * sin`, where `rotate_half([x1, x2]) = [-x2, x1]` splits the
    /// head in two halves (Hugging Face's layout; burn's `RotaryEncoding` rotates neighbours instead).
    ///
    /// `rotate_half(x) * sin` is computed as `[x2, x1] * [-sin, sin]` (the sign is in the table), and `[x2, x1]`
    /// as one flip of the head viewed as `[2, head_dim / 2]`. Slicing the halves and concatenating them would cost
    /// four copy kernels forward and more backward: a half-head slice is not aligned to the GPU's memory offsets,
    /// so it cannot be a view. `x` comes in the projection's contiguous layout so the reshapes are views too.
    /// Exact either way: the products differ only in where the sign is applied.
    ///
    /// # Shapes
    /// `x`: `[batch, seq, heads, head_dim]` → same
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let [batch, seq, heads, head_dim] = x.dims();
        let half = head_dim / 2;
        let [cos, sin] = self
            .tables(seq, x.dtype())
            .map(|t| t.reshape([1, seq, 1, head_dim]));
        let swapped = x
            .clone()
            .reshape([batch, seq, heads, 2, half])
            .flip([3])
            .reshape([batch, seq, heads, head_dim]);
        x * cos + swapped * sin
    }

    /// [`apply`](Self::apply) to heads in the head-major layout of the GPU's attention ([`Attention::forward`]):
    /// the same products, with the tables read transposed (views) and the head's two halves swapped.
    ///
    /// Where no gradient flows (prediction, evaluation, the layers below the first adapter), `x` and its swapped
    /// halves are both read with `select` along the head, by the index rows of [`order`](Self::order): burn's
    /// fusion runs indexed reads inside the element-wise kernel that does the products, one kernel per call, where
    /// a flip is a copy kernel of its own before it. A tensor read by index cannot also be read plainly in one
    /// fused kernel, hence `x` selected in its own order too. Under autodiff the flip stays: `select`'s backward
    /// scatters into a zeroed tensor, two kernels where the flip's backward is one flip.
    ///
    /// # Shapes
    /// `x`: `[batch, heads, head_dim, seq]` → same
    pub fn apply_t(&self, x: Tensor<4>) -> Tensor<4> {
        let [batch, heads, head_dim, seq] = x.dims();
        let half = head_dim / 2;
        let [cos, sin] = self
            .tables(seq, x.dtype())
            .map(|t| t.transpose().reshape([1, 1, head_dim, seq]));
        if !tracked(&x) {
            let [x, swapped] = self.order.clone().map(|order| x.clone().select(2, order));
            return x * cos + swapped * sin;
        }
        let swapped = x
            .clone()
            .reshape([batch, heads, 2, half, seq])
            .flip([2])
            .reshape([batch, heads, head_dim, seq]);
        x * cos + swapped * sin
    }
}

/// `true` where a query may *not* look: the future, and for a sliding layer anything `window` or more tokens
/// back (transformers: key `j` is visible to query `i` when `i - window < j <= i`).
///
/// Built on the host and uploaded: burn's `tril_mask`/`triu_mask` make each mask from two `arange`s, each a
/// fill and a cumulative sum on the device, then a comparison. For the causal and the sliding mask of a pass
/// that was 22 kernel launches (bench/kernels.sh) for what is one upload each.
///
/// # Shapes
/// → `[seq, seq]`
pub fn attention_mask(seq: usize, window: Option<usize>, device: &Device) -> Tensor<2, Bool> {
    let hidden = |i: usize, j: usize| j > i || window.is_some_and(|w| i >= j + w);
    let data: Vec<bool> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| hidden(i, j)))
        .collect();
    Tensor::from_data(TensorData::new(data, [seq, seq]), device)
}

#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: Projection,
    pub k_proj: Projection,
    pub v_proj: Projection,
    pub o_proj: Projection,
    #[module(skip)]
    pub num_heads: usize,
    #[module(skip)]
    pub num_kv_heads: usize,
    #[module(skip)]
    pub head_dim: usize,
    /// **query_pre_attn_scalar**: `query_pre_attn_scalar^-0.5`.
    #[module(skip)]
    pub scale: f64,
    #[module(skip)]
    pub softcap: Option<f64>,
}

impl Attention {
    /// # Shapes
    /// `x`: `[batch, seq, hidden]`, `mask`: `[seq, seq]` (true = hidden) → `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<3>, rope: &Rope, mask: Tensor<2, Bool>) -> Tensor<3> {
        let packed = [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
            .iter()
            .any(|p| p.quantized && p.in_kernel);
        match on_cpu(&x.device()) || packed {
            true => self.forward_token_major(x, rope, mask),
            false => self.forward_head_major(x, rope, mask),
        }
    }

    /// Attention in the projections' own layout, a token's heads side by side (`[batch, seq, heads, head_dim]`),
    /// seen as `[batch, heads, seq, head_dim]` for the matmuls: the CPU's path, whose fused kernels read any
    /// layout, and the path of weights packed for the GPU's matmul kernel. On a GPU each such view of a head is
    /// copied before a matmul (its heads interleave in memory, which the matmul kernels do not read in place).
    pub fn forward_token_major(&self, x: Tensor<3>, rope: &Rope, mask: Tensor<2, Bool>) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = rope
            .apply(self.q_proj.forward(x.clone()).reshape([batch, seq, h, d]))
            .swap_dims(1, 2); // [batch, h, seq, d]
        let k = rope
            .apply(self.k_proj.forward(x.clone()).reshape([batch, seq, kv, d]))
            .swap_dims(1, 2); // [batch, kv, seq, d]
        let v = self
            .v_proj
            .forward(x)
            .reshape([batch, seq, kv, d])
            .swap_dims(1, 2); // [batch, kv, seq, d]
        let kernel = Kernel::for_inputs(&[&q, &k, &v]);
        let out = grouped_attention(kernel, q, k, v, mask, self.scale, self.softcap); // [batch, h, seq, d]
        self.o_proj
            .forward(out.swap_dims(1, 2).reshape([batch, seq, h * d]))
    }

    /// Attention with every head a matrix of its own in memory, the GPU's path. The projections are computed
    /// transposed ([`Projection::forward_t`]: `Wᵀ xᵀ`, `[batch, heads · head_dim, seq]`), so each head is a
    /// contiguous `[head_dim, seq]` block, which the matmul kernels read in place, transposed or not. The token-major
    /// path copied the queries, keys and values and the attention's output before or after a matmul in every
    /// layer (4 copy kernels per layer forward, more for their gradients backward); here nothing is copied, and
    /// `o_proj`'s output comes back as a transposed view of `[batch, seq, hidden]`. The same products, in the
    /// same precision.
    pub fn forward_head_major(&self, x: Tensor<3>, rope: &Rope, mask: Tensor<2, Bool>) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let xt = x.swap_dims(1, 2); // [batch, hidden, seq], a view
        let q = rope.apply_t(self.q_proj.forward_t(xt.clone()).reshape([batch, h, d, seq]));
        let k = rope.apply_t(self.k_proj.forward_t(xt.clone()).reshape([batch, kv, d, seq]));
        let v = self.v_proj.forward_t(xt).reshape([batch, kv, d, seq]);
        let out = head_major_attention(q, k, v, mask, self.scale, self.softcap); // [batch, h, d, seq]
        self.o_proj
            .forward_t(out.reshape([batch, h * d, seq]))
            .swap_dims(1, 2)
    }
}

/// How a pass computes the two places where Gemma-2 does element-wise work on large activations: attention (the
/// scores' scale, **soft-cap**, mask and softmax) and the feed-forward's **GeGLU** (`gelu_tanh(gate) * up`). All
/// three kernels compute the same functions; they differ in where the work runs, in what goes through memory, and
/// in how autodiff differentiates them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// transformers' eager computation, op by op, each step's whole tensor written out for the next. On burn's GPU
    /// backend fusion joins the element-wise ops into one kernel; autodiff differentiates each op, which is what
    /// training needs. The CPU backend runs each element-wise op (tanh, the mask, every multiplication) as its own
    /// pass over memory, on one core.
    Eager,
    /// Attention as the eager kernel's two matmuls in f32, and between them the scale, soft-cap, mask and softmax in
    /// one pass over host memory split across threads, over each query's visible keys only
    /// ([`softcapped_softmax`](super::cpu_kernels::softcapped_softmax)); a half-precision input is widened first and
    /// the output rounded once, where the eager kernel also rounds the scores and the probabilities. GeGLU in one
    /// pass over host memory split across threads ([`fused_geglu`]). Both with a `tanh` the compiler vectorises
    /// ([`cpu_kernels::tanh`](super::cpu_kernels::tanh)). The results are untracked: autodiff cannot see into the
    /// host passes.
    Fused,
    /// [`Fused`](Self::Fused)'s values, with gradients: the host passes also write each function's derivative, and
    /// the result is handed to autodiff as its first-order expansion at the inputs' own values, `f(x₀) + f'(x₀) ·
    /// (x - x₀)` with `x₀ = x.detach()`. The second term is zero, so the value is `f(x₀)`, the fused kernel's; the
    /// gradient autodiff finds is `f'(x₀)`, the function's own. For the softmax, whose derivative is not
    /// element-wise, the term is its Jacobian times the change, `p ⊙ (c - Σ p c)` with `c` the soft-capped scores'
    /// change. Autodiff records a few multiplications and sums in place of the eager kernel's chain of `tanh`,
    /// `exp` and the rest, each of them recorded, and differentiated on one core.
    Linearised,
}

impl Kernel {
    /// On the CPU backend, [`Fused`](Self::Fused) for inputs no gradient flows back through: outside autodiff
    /// (prediction, evaluation), and in a training pass wherever the inputs depend on no trainable parameter (with
    /// a frozen base, every layer below the first adapter); [`Linearised`](Self::Linearised) where one does.
    /// [`Eager`](Self::Eager) on other backends: on the GPU fusion already joins the element-wise ops, where the
    /// host passes would copy the activations to the host and back.
    pub fn for_inputs<const D: usize>(inputs: &[&Tensor<D>]) -> Self {
        if !inputs.iter().all(|x| on_cpu(&x.device())) {
            Self::Eager
        } else if inputs.iter().any(|x| tracked(x)) {
            Self::Linearised
        } else {
            Self::Fused
        }
    }
}

/// Whether `device` is the CPU backend, with or without autodiff.
pub(super) fn on_cpu(device: &Device) -> bool {
    device.clone().inner() == Device::flex()
}

/// Whether autodiff records what is computed from `x`. Without the `native` feature (the browser) burn has no
/// autodiff, so nothing is.
fn tracked<const D: usize>(x: &Tensor<D>) -> bool {
    #[cfg(feature = "native")]
    return x.is_tracked();
    #[cfg(not(feature = "native"))]
    return {
        let _ = x;
        false
    };
}

/// `x`, computed on `device`'s backend without autodiff, back on `device`: in a training pass, an untracked tensor
/// on the autodiff device with the device's checkpointing strategy (operands that differ in it cannot meet).
fn onto<const D: usize>(x: Tensor<D>, device: &Device) -> Tensor<D> {
    #[cfg(feature = "native")]
    if let Some(strategy) = device.gradient_checkpointing_strategy() {
        return x.autodiff().with_gradient_checkpointing_strategy(strategy);
    }
    let _ = device;
    x
}

/// Scaled dot-product attention with **GQA**: each K/V head serves `h / kv` consecutive query heads
/// (transformers' `repeat_kv` order: query heads `[0, 1]` share K/V head 0, `[2, 3]` head 1, ...).
///
/// transformers copies each K/V head `h / kv` times to match the query heads. The CPU's kernels instead stack a
/// group's queries along the sequence axis, `[batch, kv, h / kv * seq, d]`, to meet their one shared K/V head in a
/// single matmul: no copies of keys and values forward, and no reduction of their copies' gradients backward, while
/// each matmul is `h / kv` times taller. The eager kernel is [`head_major_attention`] on transposed views of its
/// inputs. Every score is the same dot product in each.
///
/// # Shapes
/// `q`: `[batch, h, seq, d]`, `k`, `v`: `[batch, kv, seq, d]`, `mask`: `[seq, seq]` (true = hidden)
/// → `[batch, h, seq, d]`
fn grouped_attention(
    kernel: Kernel,
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Tensor<2, Bool>,
    scale: f64,
    softcap: Option<f64>,
) -> Tensor<4> {
    let [batch, h, seq, d] = q.dims();
    let kv = k.dims()[1];
    let group = h / kv;
    if kernel != Kernel::Eager {
        // The two matmuls as below, in f32, and between them the scale, soft-cap, mask and softmax as one parallel
        // pass over the visible scores. Fused computes on the CPU backend itself (under autodiff its inputs are
        // untracked); Linearised on the inputs' device, where autodiff records the matmuls.
        let (device, dtype) = (q.device(), q.dtype());
        let linearised = kernel == Kernel::Linearised;
        let f32 = |x: Tensor<4>| if linearised { x } else { x.inner() }.cast(FloatDType::F32);
        let scores = f32(q)
            .reshape([batch, kv, group * seq, d])
            .matmul(f32(k).swap_dims(2, 3));
        let (mut probs, scores) = match linearised {
            true => (scores.clone().inner().into_data(), Some(scores)),
            false => (scores.into_data(), None),
        };
        let mut slopes = scores.as_ref().map(|_| TensorData::zeros::<f32, _>([batch, kv, group * seq, seq]));
        let host_pass = || -> Option<()> {
            let hidden = mask.inner().try_to_vec_as::<bool>().ok()?;
            let slopes = match slopes.as_mut() {
                Some(slopes) => Some(slopes.as_mut_slice::<f32>().ok()?),
                None => None,
            };
            let (rows, cap) = (probs.as_mut_slice::<f32>().ok()?, softcap.map(|c| c as f32));
            super::cpu_kernels::softcapped_softmax(rows, slopes, &hidden, seq, scale as f32, cap);
            Some(())
        };
        host_pass().unwrap_or_else(|| unreachable!("a mask on the host, and an f32 matmul's output"));
        let (Some(scores), Some(slopes)) = (scores, slopes) else {
            let probs = Tensor::<4>::from_data(probs, &device.clone().inner());
            let out = probs.matmul(f32(v)).reshape([batch, h, seq, d]).cast(dtype);
            return onto(out, &device);
        };
        let [probs, slopes] = [probs, slopes].map(|x| Tensor::<4>::from_data(x, (&device, DType::F32)));
        // The softmax's Jacobian times the soft-capped scores' change: zero in value, the softmax's gradient.
        let change = slopes * (scores.clone() - scores.detach());
        let total = change.clone().sum_dim(3);
        let probs = probs.clone() + (change - probs * total);
        return probs.matmul(f32(v)).reshape([batch, h, seq, d]).cast(dtype);
    }
    let [q, k, v] = [q, k, v].map(|x| x.swap_dims(2, 3));
    head_major_attention(q, k, v, mask, scale, softcap).swap_dims(2, 3)
}

/// The eager attention (scale, **soft-cap**, mask, softmax in f32) on heads in the head-major layout,
/// `[batch, heads, head_dim, seq]`, transposed views of which the matmuls read in place. **GQA** by broadcasting:
/// the `h / kv` query heads of a group meet their K/V head as a batch axis of one, which the matmul kernels
/// broadcast without a copy (stacking the group's queries along the sequence, as the token-major layout allows,
/// would need one here); backward, autodiff sums the group's gradients of the shared head.
///
/// # Shapes
/// `q`: `[batch, h, d, seq]`, `k`, `v`: `[batch, kv, d, seq]`, `mask`: `[seq, seq]` (true = hidden)
/// → `[batch, h, d, seq]`
fn head_major_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Tensor<2, Bool>,
    scale: f64,
    softcap: Option<f64>,
) -> Tensor<4> {
    let [batch, h, d, seq] = q.dims();
    let kv = k.dims()[1];
    let group = h / kv;
    let q = q.reshape([batch, kv, group, d, seq]).swap_dims(3, 4); // [batch, kv, group, seq, d]
    let mut scores = q
        .matmul(k.unsqueeze_dim::<5>(2)) // [batch, kv, 1, d, seq]
        .mul_scalar(scale); // [batch, kv, group, seq, seq]
    if let Some(cap) = softcap {
        // **Attention soft-capping**, before the mask.
        scores = scores.div_scalar(cap).tanh().mul_scalar(cap);
    }
    let scores = scores.mask_fill(
        mask.unsqueeze::<5>().expand([batch, kv, group, seq, seq]),
        f32::NEG_INFINITY,
    );
    let dtype = scores.dtype();
    let probs = capped_softmax(scores.cast(FloatDType::F32), softcap, dtype).cast(dtype);
    // outᵀ = v probsᵀ: [batch, kv, 1, d, seq] @ [batch, kv, group, seq (keys), seq (queries)]
    v.unsqueeze_dim::<5>(2)
        .matmul(probs.swap_dims(3, 4))
        .reshape([batch, h, d, seq])
}

/// The softmax over the last axis of f32 scores, whose result is rounded to `out` afterwards. A softmax subtracts
/// each row's maximum before `exp`, so that `exp` cannot overflow: on a GPU the maximum and its subtraction are two
/// kernels per layer. **Attention soft-capping** already bounds every score by the cap, and `exp(cap)` times a
/// row's length stays far inside f32 (`exp(50) ≈ 5e21`; f32 ends at 3e38), so with a cap the shift can go:
/// - where no gradient flows (prediction, evaluation, the layers below the first adapter), `exp(s) / Σ exp(s)`:
///   the same probabilities up to f32 rounding;
/// - where one flows, that division's gradient divides by the square of the sum, which passes f32's range from
///   scores of about 44 on (and the sum's share of the gradient came out 0). `exp(s - ln Σ exp(s))` has no such
///   square: its gradients stay in range. It rounds `s - ln Σ` at the scores' magnitude, about 2e-6 of each
///   probability at a score of 50, far below the half-precision rounding that follows, so only where `out` is f16
///   or bf16 (the default on a GPU). Training in f32 keeps the shift.
///
/// Masked scores, -inf, give 0 in every form.
fn capped_softmax(scores: Tensor<5>, softcap: Option<f64>, out: DType) -> Tensor<5> {
    let within = softcap.is_some_and(|cap| cap.abs() <= SHIFT_FREE_CAP);
    match (within, tracked(&scores)) {
        (true, false) => {
            // Times the sum's reciprocal rather than divided by the sum: with an operation on the sum's own shape
            // after it, burn's fusion runs `exp` and the sum as one kernel; a division straight after the sum left
            // the sum a kernel of its own, one launch more per layer. It rounds twice where the division rounds
            // once, a few units in f32's last place.
            let e = scores.exp();
            let inverse = e.clone().sum_dim(4).recip();
            e * inverse
        }
        (true, true) if matches!(out, DType::F16 | DType::BF16) => {
            let log_total = scores.clone().exp().sum_dim(4).log();
            (scores - log_total).exp()
        }
        _ => softmax(scores, 4),
    }
}

/// The largest soft-cap for which [`capped_softmax`] skips the shift: `exp(60) ≈ 1.1e26`, so a row of up to 1e12
/// keys sums below f32's largest value. Gemma-2 caps at 50.
const SHIFT_FREE_CAP: f64 = 60.0;

/// **GeGLU with tanh GELU**: `down(gelu_tanh(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: Projection,
    pub up_proj: Projection,
    pub down_proj: Projection,
}

impl Mlp {
    /// # Shapes
    /// `x`: `[batch, seq, hidden]` → same
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let gate = self.gate_proj.forward(x.clone());
        let hidden = match Kernel::for_inputs(&[&gate, &x]) {
            // Off the CPU, where burn's fusion queues the operations: `up` first, so that the GELU's chain and the
            // product follow each other and run as one fused kernel. With the GELU queued between the two
            // matmuls, the product ran as a kernel of its own in every layer.
            Kernel::Eager => {
                let up = self.up_proj.forward(x);
                gelu_tanh(gate) * up
            }
            Kernel::Fused | Kernel::Linearised => {
                let up = self.up_proj.forward(x);
                // An adapter on `up_proj` alone makes `up` tracked where `gate` is not.
                match Kernel::for_inputs(&[&gate, &up]) {
                    Kernel::Fused => fused_geglu(gate, up),
                    Kernel::Linearised => linearised_geglu(gate, up),
                    Kernel::Eager => gelu_tanh(gate) * up,
                }
            }
        };
        self.down_proj.forward(hidden)
    }
}

/// [`Kernel::Fused`]'s GeGLU, for tensors on the CPU backend: [`gelu_tanh`] and the product with `up` in one pass
/// over the data in host memory, in parallel chunks, where the eager path makes ten passes in f32 and twelve in half
/// precision (the casts, the cube, the scalings, `tanh`, the sums, the product), each on one core. It repeats the
/// eager path's f32 operations in their order and rounds where it rounds (the GELU to the activation dtype, then the
/// product; there is no `mul_add` to contract, and Rust does not contract on its own), with one difference: `tanh`
/// is [`cpu_kernels::tanh`](super::cpu_kernels::tanh), which the compiler vectorises, where the eager path calls
/// glibc's once per value (in f32 a sixth of a forward pass went to those calls). Both are within 1.4 ulp of the
/// exact value; 99.7% of f32 results keep the eager bits (tested).
///
/// Meant for the CPU backend, where reading a tensor's data is a copy in host memory; elsewhere it would copy the
/// activations to the host and back. On an autodiff device the result is a new, untracked tensor: autodiff cannot
/// see through it, so [`Kernel::for_inputs`] picks it only for inputs no gradient flows back through.
///
/// # Panics
/// If the tensors are not float tensors of the same shape and dtype.
pub fn fused_geglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    geglu_pass::<D, false>(gate, up).0
}

/// [`Kernel::Linearised`]'s GeGLU: [`fused_geglu`]'s value, which autodiff differentiates as the eager GeGLU.
///
/// The host pass that computes `gelu(gate)` also computes its slope times `up`, `gelu'(gate) · up`, both untracked.
/// The result is then written as its first-order expansion at the inputs' own values,
/// `gelu(gate) · up + gelu'(gate) · up · (gate - gate.detach())`: the second term is zero, so the value is
/// [`fused_geglu`]'s bit for bit, and its gradients are `gelu'(gate) · up` for `gate` and `gelu(gate)` for `up`, the
/// GeGLU's own. Four element-wise ops for autodiff to record and two for it to run backward, where the eager GeGLU
/// records ten in f32 (among them glibc's `tanh`, one scalar call per value), each with its own backward.
///
/// # Panics
/// As [`fused_geglu`].
pub fn linearised_geglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    let (gelu, slope) = geglu_pass::<D, true>(gate.clone(), up.clone());
    let offset = gate.clone() - gate.detach();
    gelu * up + slope * offset
}

/// The host pass of [`fused_geglu`] (`LINEARISED` false: the product in the first tensor, the second is `up`) and
/// of [`linearised_geglu`] (`LINEARISED`: the GELU in the first tensor, its slope times `up` in the second; where
/// that overflows the dtype it saturates at its largest finite value, so that times zero it stays zero).
fn geglu_pass<const D: usize, const LINEARISED: bool>(gate: Tensor<D>, up: Tensor<D>) -> (Tensor<D>, Tensor<D>) {
    use burn::tensor::Element;

    /// Chunks small enough to split a `[1, 512, 2304]` activation (gemma-2-2b, one row) between many cores, large
    /// enough that each is long work next to the cost of handing it to a thread.
    const CHUNK: usize = 1 << 14;
    const CUBE: f32 = 0.044715;

    // The conversions are type parameters, not function pointers, so that the f32 loop inlines and vectorises.
    fn apply<E, W, N, const LINEARISED: bool>(gate: &mut [E], up: &mut [E], largest: f32, widen: W, narrow: N)
    where
        E: Element + Copy + Send + Sync,
        W: Fn(E) -> f32 + Copy + Send + Sync,
        N: Fn(f32) -> E + Copy + Send + Sync,
    {
        let one = |g: &mut E, u: &mut E| {
            let x = widen(*g);
            let inner = (x + x * x * x * CUBE) * SQRT_2_OVER_PI as f32;
            let t = super::cpu_kernels::tanh(inner);
            let gelu = narrow(x * (t + 1.0) * 0.5);
            if LINEARISED {
                // d/dx of 0.5 x (1 + tanh(c (x + a x³))).
                let dinner = SQRT_2_OVER_PI as f32 * (1.0 + 3.0 * CUBE * x * x);
                let slope = (t + 1.0) * 0.5 + x * 0.5 * (1.0 - t * t) * dinner;
                *g = gelu;
                *u = narrow((slope * widen(*u)).clamp(-largest, largest));
            } else {
                *g = narrow(widen(gelu) * widen(*u));
            }
        };
        let chunk = |(g, u): (&mut [E], &mut [E])| g.iter_mut().zip(u).for_each(|(g, u)| one(g, u));
        #[cfg(feature = "native")]
        {
            use rayon::prelude::*;
            gate.par_chunks_mut(CHUNK).zip(up.par_chunks_mut(CHUNK)).for_each(chunk);
        }
        #[cfg(not(feature = "native"))]
        gate.chunks_mut(CHUNK).zip(up.chunks_mut(CHUNK)).for_each(chunk);
    }

    let (device, dtype, dims) = (gate.device(), gate.dtype(), gate.dims());
    assert_eq!(dims, up.dims(), "GeGLU: gate and up differ in shape");
    let mut data = gate.into_data();
    let mut up = up.into_data();
    let mut slices = || -> Option<()> {
        let (g, u) = (&mut data, &mut up);
        match dtype {
            DType::F32 => apply::<_, _, _, LINEARISED>(
                g.as_mut_slice::<f32>().ok()?,
                u.as_mut_slice().ok()?,
                f32::MAX,
                |x| x,
                |x| x,
            ),
            DType::F16 => apply::<_, _, _, LINEARISED>(
                g.as_mut_slice::<half::f16>().ok()?,
                u.as_mut_slice().ok()?,
                half::f16::MAX.to_f32(),
                half::f16::to_f32,
                half::f16::from_f32,
            ),
            DType::BF16 => apply::<_, _, _, LINEARISED>(
                g.as_mut_slice::<half::bf16>().ok()?,
                u.as_mut_slice().ok()?,
                half::bf16::MAX.to_f32(),
                half::bf16::to_f32,
                half::bf16::from_f32,
            ),
            _ => return None,
        }
        Some(())
    };
    slices().unwrap_or_else(|| panic!("GeGLU: {dtype:?} activations, or gate and up in different dtypes"));
    (Tensor::from_data(data, (&device, dtype)), Tensor::from_data(up, (&device, dtype)))
}

/// `sqrt(2/π)`, in the tanh GELU. burn scales an f32 tensor by it rounded to f32, as [`fused_geglu`] does.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;

/// GELU, tanh approximation (PyTorch's `gelu(approximate="tanh")`):
/// `0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`, computed in f32 whatever the activation dtype and rounded once,
/// as PyTorch's kernel does (it computes half-precision inputs in its float "opmath" type). Op by op in f16,
/// `1 + tanh(..)` cancels on the negative side: from x ≈ -3.6 tanh rounds to -1 and the sum to 0, where the true
/// values are small but representable (gelu(-4) = -7.0e-5), and from -3.5 to -2.5 the result is off by 1% to 39%.
/// That error always points the same way, and every one of the feed-forward's channels multiplies its `up` value by
/// it, unlike f16's rounding elsewhere; PyTorch does not make it. The cube also overflows f16 past |x| ≈ 40. The two
/// casts are element-wise work, which burn's fusion joins to its neighbours. burn's `gelu_approximate` computes the
/// same formula with `powf` for the cube, which on the CPU backend costs more than the two multiplications here.
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let dtype = x.dtype();
    let x = x.cast(FloatDType::F32);
    let cube = x.clone() * x.clone() * x.clone();
    let inner = (x.clone() + cube * 0.044715) * SQRT_2_OVER_PI;
    ((x * (inner.tanh() + 1.0)) * 0.5).cast(dtype)
}

/// One block with Gemma-2's **sandwich norms** around attention and around the feed-forward block.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub pre_feedforward_layernorm: RmsNorm,
    pub mlp: Mlp,
    pub post_feedforward_layernorm: RmsNorm,
    /// **Alternating sliding window**: `Some(window)` on local layers.
    #[module(skip)]
    pub sliding_window: Option<usize>,
}

impl DecoderLayer {
    /// # Shapes
    /// `x`: `[batch, seq, hidden]` → same
    pub fn forward(&self, x: Tensor<3>, rope: &Rope, mask: Tensor<2, Bool>) -> Tensor<3> {
        let attn = self
            .self_attn
            .forward(self.input_layernorm.forward(x.clone()), rope, mask);
        let x = x + self.post_attention_layernorm.forward(attn);
        let ff = self
            .mlp
            .forward(self.pre_feedforward_layernorm.forward(x.clone()));
        x + self.post_feedforward_layernorm.forward(ff)
    }
}

/// The transformer body (`model.*` keys).
#[derive(Module, Debug)]
pub struct Gemma2Model {
    /// `[vocab, hidden]`; a `[1, hidden]` placeholder when the table is [`packed`](Self::packed_embed).
    pub embed_tokens: Param<Tensor<2>>,
    /// The token embedding kept packed (a web bundle's int8 or q4 table), unpacked row by row as it is looked up.
    #[module(skip)]
    pub packed_embed: Option<super::quant::PackedEmbedding>,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    #[module(skip)]
    pub hidden_size: usize,
    #[module(skip)]
    pub head_dim: usize,
    #[module(skip)]
    pub rope_theta: f64,
}

impl Gemma2Model {
    /// # Shapes
    /// `input_ids`: `[batch, seq]` → hidden states `[batch, seq, hidden]`
    ///
    /// `input_ids` may be on the embedding's device or the compute device (see [`super::placement`]); the
    /// layers run where the final norm's weight is.
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        let mut pass = self.begin(input_ids);
        while self.step(&mut pass) {}
        self.finish(pass)
    }

    /// The embedded input, ready for the first layer. With [`step`](Self::step) and [`finish`](Self::finish),
    /// the forward pass one decoder layer at a time, for a caller that must give control back between layers
    /// (the browser's CPU fallback computes on the page's own thread).
    pub fn begin(&self, input_ids: Tensor<2, Int>) -> Pass {
        let [_, seq] = input_ids.dims();
        let norm = self.norm.weight.val();
        let (device, dtype) = (norm.device(), norm.dtype());
        // [batch, seq, hidden] in the activation dtype (a host table keeps its own: f32, or f16 as stored), then
        // moved to the compute device when the table lives on the host (a no-op otherwise). The cast comes first so
        // the GPU never receives a dtype it may not support.
        let rows = match &self.packed_embed {
            Some(table) => table.lookup(input_ids.to_device(&table.device())),
            None => {
                let embed = self.embed_tokens.val();
                let ids = input_ids.to_device(&embed.device());
                burn::tensor::module::embedding(embed, ids)
            }
        };
        let x = rows.cast(dtype).to_device(&device);
        // **Embedding scale**: times sqrt(hidden); a scalar takes the tensor's dtype, so in bf16 the factor is
        // rounded to bf16 first, as transformers does.
        let x = x.mul_scalar((self.hidden_size as f64).sqrt());
        Pass {
            x,
            rope: Rope::new(seq, self.head_dim, self.rope_theta, &device).cast(dtype),
            full: attention_mask(seq, None, &device),
            local: None,
            next: 0,
        }
    }

    /// Runs the next decoder layer; `false` once every layer has run.
    pub fn step(&self, pass: &mut Pass) -> bool {
        let Some(layer) = self.layers.get(pass.next) else {
            return false;
        };
        let [_, seq, _] = pass.x.dims();
        let mask = match layer.sliding_window {
            Some(w) => match &pass.local {
                Some((lw, m)) if *lw == w => m.clone(),
                _ => {
                    let m = attention_mask(seq, Some(w), &pass.x.device());
                    pass.local = Some((w, m.clone()));
                    m
                }
            },
            None => pass.full.clone(),
        };
        let device = pass.x.device();
        // Take x out (a placeholder stays) so the layer owns its only handle and can reuse the buffer.
        let x = std::mem::replace(&mut pass.x, Tensor::empty([0, 0, 0], &device));
        pass.x = layer.forward(x, &pass.rope, mask);
        pass.next += 1;
        true
    }

    /// The final norm, once every layer has run: hidden states `[batch, seq, hidden]`.
    pub fn finish(&self, pass: Pass) -> Tensor<3> {
        self.norm.forward(pass.x)
    }
}

/// A forward pass in progress (see [`Gemma2Model::begin`]).
pub struct Pass {
    x: Tensor<3>,
    rope: Rope,
    full: Tensor<2, Bool>,
    /// The sliding-window mask, built on first use and shared by every local layer.
    local: Option<(usize, Tensor<2, Bool>)>,
    next: usize,
}

/// `Gemma2ForSequenceClassification`.
#[derive(Module, Debug)]
pub struct Gemma2ForSequenceClassification {
    pub model: Gemma2Model,
    /// `[hidden, num_labels]` (checkpoint: `score.weight`, `[num_labels, hidden]`), no bias.
    pub score: Linear,
}

impl Gemma2ForSequenceClassification {
    /// Class logits of each row, from the hidden state of its last real token (`lengths[i] - 1`: rows are padded
    /// on the right).
    ///
    /// # Shapes
    /// `input_ids`: `[batch, seq]`, `last`: `[batch]` (index of the last non-padding token) → `[batch, num_labels]`
    pub fn forward(&self, input_ids: Tensor<2, Int>, last: Tensor<1, Int>) -> Tensor<2> {
        self.classify(self.model.forward(input_ids), last)
    }

    /// The head on the body's output: pool the last real token of each row, then `score`.
    ///
    /// # Shapes
    /// `hidden`: `[batch, seq, hidden]`, `last`: `[batch]` → `[batch, num_labels]`
    pub fn classify(&self, hidden: Tensor<3>, last: Tensor<1, Int>) -> Tensor<2> {
        let [batch, _, width] = hidden.dims();
        let index = last.reshape([batch, 1, 1]).expand([batch, 1, width]);
        let pooled = hidden.gather(1, index).reshape([batch, width]); // [batch, hidden]
        // A half-precision body may feed an f32 head (training keeps trainable weights in f32).
        let pooled = pooled.cast(self.score.weight.val().dtype());
        self.score.forward(pooled)
    }

    /// [`forward`](Self::forward) on a padded [`crate::batch::Batch`]; `device` is the compute device. The ids
    /// are created where the embedding table is, so a host-side table never reads them back from a GPU.
    pub fn forward_batch(&self, batch: &crate::batch::Batch, device: &Device) -> Tensor<2> {
        let (ids, last) = self.batch_inputs(batch, device);
        self.forward(ids, last)
    }

    /// A padded batch's input ids, on the embedding's device, and last-token indices, on `device` (compute).
    pub fn batch_inputs(
        &self,
        batch: &crate::batch::Batch,
        device: &Device,
    ) -> (Tensor<2, Int>, Tensor<1, Int>) {
        batch_tensors(batch, &self.embedding_device(), device)
    }

    /// Rows of the token embedding: every input id must be below it.
    pub fn vocab_size(&self) -> usize {
        match &self.model.packed_embed {
            Some(table) => table.vocab_size(),
            None => self.model.embed_tokens.val().dims()[0],
        }
    }

    /// The device the token embedding lives on: the compute device, or the host when the table is larger than
    /// one GPU binding (see [`super::placement`]).
    pub fn embedding_device(&self) -> Device {
        match &self.model.packed_embed {
            Some(table) => table.device(),
            None => self.model.embed_tokens.device(),
        }
    }
}

/// Input ids `[batch, seq]` (on `ids_device`) and last-token indices `[batch]` (on `device`) of a padded batch.
pub fn batch_tensors(
    batch: &crate::batch::Batch,
    ids_device: &Device,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<1, Int>) {
    let ids = Tensor::<2, Int>::from_data(
        TensorData::new(batch.input_ids.clone(), [batch.batch_size, batch.seq_len]),
        ids_device,
    );
    let last: Vec<i32> = batch
        .lengths
        .iter()
        .map(|&l| l.saturating_sub(1) as i32)
        .collect();
    (
        ids,
        Tensor::<1, Int>::from_data(TensorData::new(last, [batch.batch_size]), device),
    )
}

/// Where [`Gemma2Config::build`] gets each parameter, by Hugging Face key: fresh random values
/// ([`RandomInit`]) or a checkpoint ([`super::load`]).
pub trait ParamSource {
    type Error;
    /// A norm's weight (`[n]`, the offset from one).
    fn norm(&mut self, key: &str, n: usize) -> Result<Tensor<1>, Self::Error>;
    /// A bias-free Linear from `key`'s `[d_out, d_in]` weight.
    fn linear(&mut self, key: &str, d_in: usize, d_out: usize) -> Result<Linear, Self::Error>;
    /// The token embedding kept packed, where the source has it so and wants it kept (see
    /// [`super::quant::PackedEmbedding`]); `None` to take [`embedding`](Self::embedding) instead.
    fn packed_embedding(
        &mut self,
        _key: &str,
        _vocab: usize,
        _hidden: usize,
    ) -> Result<Option<super::quant::PackedEmbedding>, Self::Error> {
        Ok(None)
    }
    /// The `[vocab, hidden]` embedding table.
    fn embedding(
        &mut self,
        key: &str,
        vocab: usize,
        hidden: usize,
    ) -> Result<Tensor<2>, Self::Error>;
    /// The classification head; a source without one may start it fresh.
    fn head(&mut self, key: &str, d_in: usize, d_out: usize) -> Result<Linear, Self::Error> {
        self.linear(key, d_in, d_out)
    }
}

/// transformers' initialisation: normal(0, 0.02) weights and zero norm offsets, so every norm starts as the
/// identity scale.
pub struct RandomInit<'a> {
    pub device: &'a Device,
    /// Where the embedding table goes (see [`super::placement`]).
    pub embedding_device: &'a Device,
}

impl RandomInit<'_> {
    pub const STD: f64 = 0.02;
    fn normal() -> Initializer {
        Initializer::Normal {
            mean: 0.0,
            std: Self::STD,
        }
    }
}

impl ParamSource for RandomInit<'_> {
    type Error = std::convert::Infallible;
    fn norm(&mut self, _key: &str, n: usize) -> Result<Tensor<1>, Self::Error> {
        Ok(Tensor::zeros([n], self.device))
    }
    fn linear(&mut self, _key: &str, d_in: usize, d_out: usize) -> Result<Linear, Self::Error> {
        let linear = LinearConfig::new(d_in, d_out)
            .with_bias(false)
            .with_initializer(Self::normal())
            .init(self.device);
        // burn draws an initializer's values when the parameter is first read. Read now, in build order: else the
        // weights would depend on what else drew from the device's RNG first (adapters attached before the first
        // forward pass, say), and one seed would not give one model.
        let _ = linear.weight.val();
        Ok(linear)
    }
    fn embedding(
        &mut self,
        _key: &str,
        vocab: usize,
        hidden: usize,
    ) -> Result<Tensor<2>, Self::Error> {
        Ok(Self::normal()
            .init([vocab, hidden], self.embedding_device)
            .val())
    }
}

impl Gemma2Config {
    /// A randomly initialised classifier (see [`RandomInit`]).
    /// `placement`: a device (`&device`), or a device with its binding limit ([`Placement`]).
    pub fn init(&self, placement: impl Into<Placement>) -> Gemma2ForSequenceClassification {
        let placement = placement.into();
        let embedding_device = placement.embedding_device(self.vocab_size, self.hidden_size, 4);
        let mut source = RandomInit {
            device: &placement.compute,
            embedding_device: &embedding_device,
        };
        match self.build(&mut source) {
            Ok(model) => model,
            Err(never) => match never {},
        }
    }

    /// Builds the classifier, taking every parameter from `source` by its Hugging Face key.
    pub fn build<S: ParamSource>(
        &self,
        source: &mut S,
    ) -> Result<Gemma2ForSequenceClassification, S::Error> {
        let (hidden, eps) = (self.hidden_size, self.rms_norm_eps);
        let (q, kv) = (
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
        );
        let mut layers = Vec::with_capacity(self.num_hidden_layers);
        for (i, t) in self.layer_types.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let mut norm = |name: &str| -> Result<RmsNorm, S::Error> {
                Ok(RmsNorm::new(
                    source.norm(&format!("{p}.{name}.weight"), hidden)?,
                    eps,
                ))
            };
            let input_layernorm = norm("input_layernorm")?;
            let post_attention_layernorm = norm("post_attention_layernorm")?;
            let pre_feedforward_layernorm = norm("pre_feedforward_layernorm")?;
            let post_feedforward_layernorm = norm("post_feedforward_layernorm")?;
            layers.push(DecoderLayer {
                input_layernorm,
                self_attn: Attention {
                    q_proj: Projection::plain(source.linear(
                        &format!("{p}.self_attn.q_proj"),
                        hidden,
                        q,
                    )?),
                    k_proj: Projection::plain(source.linear(
                        &format!("{p}.self_attn.k_proj"),
                        hidden,
                        kv,
                    )?),
                    v_proj: Projection::plain(source.linear(
                        &format!("{p}.self_attn.v_proj"),
                        hidden,
                        kv,
                    )?),
                    o_proj: Projection::plain(source.linear(
                        &format!("{p}.self_attn.o_proj"),
                        q,
                        hidden,
                    )?),
                    num_heads: self.num_attention_heads,
                    num_kv_heads: self.num_key_value_heads,
                    head_dim: self.head_dim,
                    scale: self.query_pre_attn_scalar.powf(-0.5),
                    softcap: self.attn_logit_softcapping,
                },
                post_attention_layernorm,
                pre_feedforward_layernorm,
                mlp: Mlp {
                    gate_proj: Projection::plain(source.linear(
                        &format!("{p}.mlp.gate_proj"),
                        hidden,
                        self.intermediate_size,
                    )?),
                    up_proj: Projection::plain(source.linear(
                        &format!("{p}.mlp.up_proj"),
                        hidden,
                        self.intermediate_size,
                    )?),
                    down_proj: Projection::plain(source.linear(
                        &format!("{p}.mlp.down_proj"),
                        self.intermediate_size,
                        hidden,
                    )?),
                },
                post_feedforward_layernorm,
                sliding_window: (*t == LayerType::SlidingAttention).then_some(self.sliding_window),
            });
        }
        let embed_key = "model.embed_tokens.weight";
        let packed_embed = source.packed_embedding(embed_key, self.vocab_size, hidden)?;
        let embed_tokens = match &packed_embed {
            Some(table) => Tensor::zeros([1, hidden], &table.device()),
            None => source.embedding(embed_key, self.vocab_size, hidden)?,
        };
        Ok(Gemma2ForSequenceClassification {
            model: Gemma2Model {
                embed_tokens: Param::from_tensor(embed_tokens),
                packed_embed,
                layers,
                norm: RmsNorm::new(source.norm("model.norm.weight", hidden)?, eps),
                hidden_size: hidden,
                head_dim: self.head_dim,
                rope_theta: self.rope_theta,
            },
            score: source.head("score", hidden, self.num_labels())?,
        })
    }
}

#[cfg(all(test, feature = "native"))]
mod tests {
    //! Each Gemma-2 detail alone, on the CPU backend. End-to-end equality with transformers, and each detail
    //! against transformers with that detail switched off, are in `tests/tests/model_parity.rs`.
    use burn::tensor::DType;

    use super::*;

    fn dev() -> Device {
        Device::flex()
    }

    fn vec(t: Tensor<2>) -> Vec<f32> {
        t.try_to_vec_as::<f32>().unwrap()
    }

    #[test]
    fn rms_norm_scales_by_one_plus_weight() {
        let x = [1.0f64, -2.0, 3.0, 0.5];
        let w = [0.5f32, -1.0, 0.0, 2.0];
        let norm = RmsNorm::new(
            Tensor::from_data(TensorData::new(w.to_vec(), [4]), &dev()),
            1e-6,
        );
        let input = Tensor::<3>::from_data(
            TensorData::new(x.iter().map(|&v| v as f32).collect(), [1, 1, 4]),
            &dev(),
        );
        let out = norm.forward(input).try_to_vec_as::<f32>().unwrap();
        let rms = (x.iter().map(|v| v * v).sum::<f64>() / 4.0 + 1e-6).sqrt();
        for k in 0..4 {
            let expected = x[k] / rms * (1.0 + f64::from(w[k]));
            assert!(
                (f64::from(out[k]) - expected).abs() < 1e-6,
                "{k}: {} vs {expected}",
                out[k]
            );
        }
        assert_eq!(
            out[1], 0.0,
            "weight -1 zeroes the channel: the scale is 1 + w, not w"
        );
    }

    #[test]
    fn embedding_scale_is_rounded_to_the_activation_dtype() {
        // gemma-2-9b: sqrt(3584) = 59.87, which bf16 holds as 59.75; transformers multiplies by the rounded value.
        let factor = 3584f64.sqrt();
        let x = Tensor::<1>::ones([1], (&dev(), DType::BF16)).mul_scalar(factor);
        let got = x.try_to_vec_as::<f32>().unwrap()[0];
        assert_eq!(got, half::bf16::from_f64(factor).to_f32());
        assert_ne!(got, factor as f32);
    }

    #[test]
    fn sliding_window_hides_keys_window_or_more_back() {
        let m = attention_mask(5, Some(2), &dev())
            .try_to_vec_as::<bool>()
            .unwrap();
        // Row i may see j with i - 2 < j <= i.
        let expected: Vec<bool> = (0..5)
            .flat_map(|i| (0..5).map(move |j| !(j <= i && i < j + 2)))
            .collect();
        assert_eq!(m, expected);
        let full = attention_mask(5, None, &dev())
            .try_to_vec_as::<bool>()
            .unwrap();
        assert_eq!(
            full,
            (0..5)
                .flat_map(|i| (0..5).map(move |j| j > i))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            attention_mask(5, Some(8), &dev())
                .try_to_vec_as::<bool>()
                .unwrap(),
            full
        );
    }

    #[test]
    fn gqa_shares_each_kv_head_with_consecutive_query_heads() {
        // Two K/V heads whose values are a = 1 and b = 2, four query heads, one token (so each head's output is
        // its K/V head's value): [a, a, b, b] (transformers' repeat_kv), not [a, b, a, b].
        let q = Tensor::<4>::zeros([1, 4, 1, 1], &dev());
        let k = Tensor::<4>::zeros([1, 2, 1, 1], &dev());
        let v = Tensor::<4>::from_data(TensorData::new(vec![1.0f32, 2.0], [1, 2, 1, 1]), &dev());
        for kernel in [Kernel::Eager, Kernel::Fused] {
            let mask = attention_mask(1, None, &dev());
            let out = grouped_attention(kernel, q.clone(), k.clone(), v.clone(), mask, 1.0, None);
            assert_eq!(out.dims(), [1, 4, 1, 1], "{kernel:?}");
            let got = out.try_to_vec_as::<f32>().unwrap();
            assert_eq!(got, [1.0, 1.0, 2.0, 2.0], "{kernel:?}");
        }
    }

    #[test]
    fn grouped_attention_equals_attention_over_repeated_heads() {
        // Against the plain computation: each K/V head copied to its query heads, one matmul per head. Random
        // values, three heads per group, three tokens and a sliding causal mask, so that a wrong stacking order
        // of a group's queries (heads within a group swapped with positions) would mix rows and show.
        let (batch, h, kv, seq, d) = (2, 6, 2, 3, 4);
        let dist = burn::tensor::Distribution::Normal(0.0, 1.0);
        let q = Tensor::<4>::random([batch, h, seq, d], dist, &dev());
        let k = Tensor::<4>::random([batch, kv, seq, d], dist, &dev());
        let v = Tensor::<4>::random([batch, kv, seq, d], dist, &dev());
        let mask = attention_mask(seq, Some(2), &dev());
        let repeat = |x: Tensor<4>| {
            x.reshape([batch, kv, 1, seq, d])
                .expand([batch, kv, h / kv, seq, d])
                .reshape([batch, h, seq, d])
        };
        let scores = q.clone().matmul(repeat(k.clone()).swap_dims(2, 3)).mul_scalar(0.5);
        let scores = scores.div_scalar(5.0).tanh().mul_scalar(5.0).mask_fill(
            mask.clone().unsqueeze::<4>().expand([batch, h, seq, seq]),
            f32::NEG_INFINITY,
        );
        let want = softmax(scores, 3).matmul(repeat(v.clone()));
        let want = want.try_to_vec_as::<f32>().unwrap();
        for kernel in [Kernel::Eager, Kernel::Fused] {
            let got = grouped_attention(
                kernel,
                q.clone(),
                k.clone(),
                v.clone(),
                mask.clone(),
                0.5,
                Some(5.0),
            );
            let worst = max_difference(&got.try_to_vec_as::<f32>().unwrap(), &want);
            assert!(worst < 1e-6, "{kernel:?}: max |difference| {worst}");
        }
    }

    #[test]
    fn head_major_attention_equals_the_token_major_one_in_value_and_gradient() {
        // The GPU's layout against the CPU's (both run on any backend): the tiny preset's first layer (a sliding
        // one, with soft-capping and GQA), adapters on all four projections whose B is not zero, two rows. The
        // loss weighs each output by a random weight, so that the input and every adapter get gradients of their
        // own. On the CPU the token-major path runs the linearised kernels, so this also holds the two
        // against each other.
        use crate::model::lora::{LoraAdapter, LoraConfig};
        let device = Device::flex().autodiff();
        let dist = burn::tensor::Distribution::Normal(0.0, 1.0);
        let config = Gemma2Config::tiny();
        let lora = LoraConfig {
            r: 4,
            dropout: 0.0,
            targets: ["q_proj", "k_proj", "v_proj", "o_proj"].map(String::from).to_vec(),
            first_layer: 0,
            ..LoraConfig::default()
        };
        let model = config.init(&device).with_lora(&lora, &device).unwrap();
        let mut attn = model.model.layers[0].self_attn.clone();
        let projections = [&mut attn.q_proj, &mut attn.k_proj, &mut attn.v_proj, &mut attn.o_proj];
        for (i, p) in projections.into_iter().enumerate() {
            let a = p.lora.take().unwrap().lora_a.val();
            let b = Tensor::<2>::random([lora.r, p.dims()[1]], dist, &device).mul_scalar(0.3);
            p.lora = Some(LoraAdapter::from_tensors(&format!("p{i}"), a, b, &lora));
        }
        let (batch, seq, hidden) = (2, 12, config.hidden_size);
        let x = Tensor::<3>::random([batch, seq, hidden], dist, &dev()).to_data();
        let weights = Tensor::<3>::random([batch, seq, hidden], dist, &device);
        let rope = Rope::new(seq, config.head_dim, config.rope_theta, &device);
        let run = |head_major: bool| {
            let x = Tensor::<3>::from_data(x.clone(), &device).require_grad();
            let mask = attention_mask(seq, Some(config.sliding_window / 3), &device);
            let out = match head_major {
                true => attn.forward_head_major(x.clone(), &rope, mask),
                false => attn.forward_token_major(x.clone(), &rope, mask),
            };
            let grads = (out.clone() * weights.clone()).sum().backward();
            let grad = |t: Tensor<2>| t.grad(&grads).unwrap().try_to_vec_as::<f32>().unwrap();
            let mut all = vec![x.grad(&grads).unwrap().try_to_vec_as::<f32>().unwrap()];
            for p in [&attn.q_proj, &attn.k_proj, &attn.v_proj, &attn.o_proj] {
                let adapter = p.lora.as_ref().unwrap();
                all.extend([grad(adapter.lora_a.val()), grad(adapter.lora_b.val())]);
            }
            (out.inner().try_to_vec_as::<f32>().unwrap(), all)
        };
        let (got, got_grads) = run(true);
        let (want, want_grads) = run(false);
        assert_eq!(got.len(), batch * seq * hidden);
        let err = relative_l1(&got, &want);
        assert!(err < 1e-5, "outputs differ by {err:.2e} (relative L1)");
        let names = ["x", "q A", "q B", "k A", "k B", "v A", "v B", "o A", "o B"];
        for (name, (got, want)) in names.iter().zip(got_grads.iter().zip(&want_grads)) {
            let err = relative_l1(got, want);
            assert!(err < 1e-5, "d/d{name} differs by {err:.2e} (relative L1)");
        }
    }

    /// Both of `apply_t`'s ways, the indexed reads without autodiff and the flip under it.
    #[test]
    fn rope_on_head_major_heads_is_rope_transposed() {
        let (batch, seq, heads, d) = (2, 5, 3, 8);
        let rope = Rope::new(seq + 2, d, 10_000.0, &dev());
        let x = Tensor::<4>::random([batch, seq, heads, d], burn::tensor::Distribution::Normal(0.0, 1.0), &dev());
        let want = rope.apply(x.clone()).permute([0, 2, 3, 1]);
        let want = want.try_to_vec_as::<f32>().unwrap();
        let untracked = rope.apply_t(x.clone().permute([0, 2, 3, 1]));
        let tracked_x = x.autodiff().require_grad();
        let tracked = rope.apply_t(tracked_x.clone().permute([0, 2, 3, 1]));
        assert!(!untracked.is_tracked() && tracked.is_tracked());
        for got in [untracked, tracked.clone()] {
            assert_eq!(max_difference(&got.try_to_vec_as::<f32>().unwrap(), &want), 0.0);
        }
        // out[j] = x[j] cos[j] + x[partner(j)] sin[j], with partner(j) = j ± d/2 (the sign is in the table), so the
        // sum's gradient at k is cos[k] + sin[partner(k)]: the flip's backward must send the gradient back across.
        let grads = tracked.sum().backward();
        let grad = tracked_x.grad(&grads).unwrap().try_to_vec_as::<f32>().unwrap();
        let [cos, sin] = [&rope.cos, &rope.sin].map(|t| t.clone().try_to_vec_as::<f32>().unwrap());
        for (i, g) in grad.iter().enumerate() {
            let (pos, k) = ((i / (heads * d)) % seq, i % d);
            let partner = if k < d / 2 { k + d / 2 } else { k - d / 2 };
            let want = cos[pos * d + k] + sin[pos * d + partner];
            assert!((g - want).abs() < 1e-6, "d/dx[{i}] = {g}, want {want}");
        }
    }

    fn max_difference(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    }

    /// Query, key and value at Gemma-2's scale: 4 query heads on 2 K/V heads, 2 rows, 40 tokens, head_dim 16, with
    /// a 1/sqrt(d)-ish scale and scores large enough for the soft-cap of 50 to bend them.
    fn attention_inputs(dtype: DType) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let dist = burn::tensor::Distribution::Normal(0.0, 6.0);
        let q = Tensor::<4>::random([2, 4, 40, 16], dist, &dev());
        let k = Tensor::<4>::random([2, 2, 40, 16], dist, &dev());
        let v = Tensor::<4>::random([2, 2, 40, 16], burn::tensor::Distribution::Normal(0.0, 1.0), &dev());
        (q.cast(dtype), k.cast(dtype), v.cast(dtype))
    }

    #[test]
    fn fused_attention_equals_eager_attention_in_f32() {
        let (q, k, v) = attention_inputs(DType::F32);
        for window in [None, Some(7)] {
            let run = |kernel| {
                let mask = attention_mask(40, window, &dev());
                let out = grouped_attention(kernel, q.clone(), k.clone(), v.clone(), mask, 0.25, Some(50.0));
                out.try_to_vec_as::<f32>().unwrap()
            };
            let worst = max_difference(&run(Kernel::Fused), &run(Kernel::Eager));
            // A soft-capped score near 50 is rounded to f32's spacing there, 3.8e-6, and one step of it moves its
            // probability by as much, relatively; with outputs of a few units, two right f32 computations differ
            // by up to about 1e-5 (over 80 runs of these random inputs: up to 1.0e-5 with the eager softmax's
            // shift, 1.1e-5 without it), which a bound of 1e-5 failed now and then.
            assert!(worst < 2e-5, "window {window:?}: max |difference| {worst}");
        }
    }

    #[test]
    fn fused_attention_in_half_precision_is_computed_in_f32_and_rounded_once() {
        // The reference is f32 attention over the same half-precision inputs widened back to f32, so that the only
        // difference left is where the kernel rounds: the fused kernel once, at its output (within one half-precision
        // ulp of values below 4 in size); the eager kernel also rounds the scores and the probabilities on the way.
        let (q, k, v) = attention_inputs(DType::F32);
        let mask = || attention_mask(40, Some(7), &dev());
        for (dtype, ulp) in [(DType::F16, 2f32.powi(-9)), (DType::BF16, 2f32.powi(-6))] {
            let [q, k, v] = [&q, &k, &v].map(|x| x.clone().cast(dtype));
            let widened = [&q, &k, &v].map(|x| x.clone().cast(DType::F32));
            let [wq, wk, wv] = widened;
            let exact = grouped_attention(Kernel::Eager, wq, wk, wv, mask(), 0.25, Some(50.0));
            let exact = exact.try_to_vec_as::<f32>().unwrap();
            let run = |kernel| {
                let out = grouped_attention(kernel, q.clone(), k.clone(), v.clone(), mask(), 0.25, Some(50.0));
                assert_eq!(out.dtype(), dtype, "{kernel:?} keeps the activation dtype");
                out.try_to_vec_as::<f32>().unwrap()
            };
            let fused = run(Kernel::Fused);
            assert!(fused.iter().all(|x| x.is_finite()), "{dtype:?}");
            let worst = max_difference(&fused, &exact);
            assert!(worst <= ulp, "{dtype:?}: fused is {worst} from f32, more than one rounding");
            let eager = max_difference(&run(Kernel::Eager), &exact);
            assert!(worst <= eager, "{dtype:?}: fused {worst}, eager {eager}");
        }
    }

    /// The spacing of `dtype`'s values at `v`.
    fn spacing(v: f32, dtype: DType) -> f32 {
        let v = v.abs();
        match dtype {
            DType::F16 => {
                let h = half::f16::from_f32(v);
                half::f16::from_bits(h.to_bits() + 1).to_f32() - h.to_f32()
            }
            DType::BF16 => {
                let h = half::bf16::from_f32(v);
                half::bf16::from_bits(h.to_bits() + 1).to_f32() - h.to_f32()
            }
            _ => f32::from_bits(v.to_bits() + 1) - v,
        }
    }

    #[test]
    fn fused_geglu_is_the_eager_geglu_but_for_tanh() {
        // Gate values over GELU's range (the cancelling negative tail, both sides of zero, f16's overflow of the
        // cube) and up values of either sign, 42,000 of them: more than one parallel chunk, and not a multiple of one.
        let n = 2 * 3 * 7000;
        let gate: Vec<f32> = (0..n).map(|i| ((i as f32 * 0.618_034) % 1.0 - 0.5) * 90.0).collect();
        let up: Vec<f32> = (0..n).map(|i| ((i as f32 * 0.414_214) % 1.0 - 0.5) * 6.0).collect();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let tensor =
                |v: &[f32]| Tensor::<3>::from_data(TensorData::new(v.to_vec(), [2, 3, 7000]), &dev()).cast(dtype);
            let values = |t: Tensor<3>| t.try_to_vec_as::<f32>().unwrap();
            let run = |kernel| {
                let out = match kernel {
                    Kernel::Eager => gelu_tanh(tensor(&gate)) * tensor(&up),
                    Kernel::Fused => fused_geglu(tensor(&gate), tensor(&up)),
                    Kernel::Linearised => unreachable!("tested against Fused"),
                };
                assert_eq!((out.dims(), out.dtype()), ([2, 3, 7000], dtype), "{kernel:?}");
                values(out)
            };
            let (eager, fused) = (run(Kernel::Eager), run(Kernel::Fused));
            let eager_gelu = values(gelu_tanh(tensor(&gate)));
            let (x, u) = (values(tensor(&gate)), values(tensor(&up)));
            // The same operations in the same order and roundings, but for `tanh`: glibc's and cpu_kernels' are
            // each within 1.4 ulp of the exact value, and |tanh| < 1, so they differ by less than 2^-22; through
            // `0.5 x (1 + tanh) u` that moves a value by at most 0.5 |x u| 2^-20 with the roundings on the way, and
            // the rounding of the GELU and of the product to the dtype can land on the other neighbour.
            let mut same = 0;
            for i in 0..n {
                let bound = 0.5 * (x[i] * u[i]).abs() * 2f32.powi(-20)
                    + spacing(eager_gelu[i], dtype) * u[i].abs()
                    + spacing(eager[i], dtype);
                let d = (fused[i] - eager[i]).abs();
                assert!(d <= bound, "{dtype:?}: gate {} up {}: fused {} eager {}", x[i], u[i], fused[i], eager[i]);
                same += usize::from(fused[i].to_bits() == eager[i].to_bits());
            }
            assert!(same * 100 >= n * 99, "{dtype:?}: only {same} of {n} values equal");
            assert!(fused.iter().any(|&x| x != 0.0 && x.abs() < 1e-3), "{dtype:?}: the small negative tail is there");
        }
    }

    #[test]
    fn kernel_is_fused_on_the_cpu_and_linearised_where_a_gradient_flows() {
        let x = || Tensor::<2>::ones([2, 3], &Device::flex());
        assert_eq!(Kernel::for_inputs(&[&x()]), Kernel::Fused, "prediction");
        let frozen = x().autodiff();
        assert_eq!(Kernel::for_inputs(&[&frozen]), Kernel::Fused, "training, below the first adapter");
        let trained = x().autodiff().require_grad();
        let derived = frozen.clone().matmul(trained.clone().transpose());
        for (tracked, why) in [(&trained, "a trainable parameter"), (&derived, "computed from one")] {
            assert_eq!(Kernel::for_inputs(&[tracked]), Kernel::Linearised, "{why}");
            assert_eq!(Kernel::for_inputs(&[&frozen, tracked]), Kernel::Linearised, "{why}, beside an untracked input");
        }
        assert!(on_cpu(&Device::flex().autodiff()));
        assert!(
            !on_cpu(&Device::wgpu(Default::default())),
            "burn's GPU attention has no GQA and a half-precision softmax; fusion joins GeGLU's ops"
        );
    }

    /// Relative L1 distance of `got` from `want`.
    fn relative_l1(got: &[f32], want: &[f32]) -> f32 {
        assert_eq!(got.len(), want.len());
        let diff: f32 = got.iter().zip(want).map(|(a, b)| (a - b).abs()).sum();
        diff / want.iter().map(|b| b.abs()).sum::<f32>()
    }

    #[test]
    fn linearised_attention_has_the_fused_values_and_the_eager_gradients() {
        // Scores large enough for the soft-cap to bend them (where its slope, 1 - tanh², is well below 1), a
        // sliding and a causal mask, with and without a cap; the loss weighs each output by a random weight, so
        // that every query, key and value gets a gradient of its own.
        let device = Device::flex().autodiff();
        let (q, k, v) = attention_inputs(DType::F32);
        let weights = Tensor::<4>::random([2, 4, 40, 16], burn::tensor::Distribution::Normal(0.0, 1.0), &dev());
        for (window, softcap) in [(Some(7), Some(50.0)), (None, Some(50.0)), (None, None)] {
            let mask = || attention_mask(40, window, &device);
            let run = |kernel| {
                let [q, k, v] = [&q, &k, &v].map(|x| Tensor::<4>::from_data(x.to_data(), &device).require_grad());
                let out = grouped_attention(kernel, q.clone(), k.clone(), v.clone(), mask(), 0.25, softcap);
                let loss = (out.clone() * Tensor::from_data(weights.to_data(), &device)).sum();
                let grads = loss.backward();
                let grad = |x: &Tensor<4>| x.grad(&grads).unwrap().try_to_vec_as::<f32>().unwrap();
                (out.inner().try_to_vec_as::<f32>().unwrap(), [grad(&q), grad(&k), grad(&v)])
            };
            let (q, k, v, mask) = (q.clone(), k.clone(), v.clone(), mask().inner());
            let fused = grouped_attention(Kernel::Fused, q, k, v, mask, 0.25, softcap);
            let (out, grads) = run(Kernel::Linearised);
            assert_eq!(out, fused.try_to_vec_as::<f32>().unwrap(), "{window:?} {softcap:?}: the fused values");
            let (_, eager) = run(Kernel::Eager);
            for (name, (got, want)) in ["q", "k", "v"].iter().zip(grads.iter().zip(&eager)) {
                let err = relative_l1(got, want);
                assert!(err < 1e-5, "{window:?} {softcap:?}: d/d{name} differs by {err:.2e} (relative L1)");
            }
        }
    }

    #[test]
    fn linearised_geglu_has_the_fused_values_and_the_eager_gradients() {
        let device = Device::flex().autodiff();
        let n = 3 * 7000;
        let gate: Vec<f32> = (0..n).map(|i| ((i as f32 * 0.618_034) % 1.0 - 0.5) * 16.0).collect();
        let up: Vec<f32> = (0..n).map(|i| ((i as f32 * 0.414_214) % 1.0 - 0.5) * 6.0).collect();
        let weights: Vec<f32> = (0..n).map(|i| ((i as f32 * 0.302_776) % 1.0 - 0.5) * 2.0).collect();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let tensor = |v: &[f32], device: &Device| {
                Tensor::<3>::from_data(TensorData::new(v.to_vec(), [1, 3, 7000]), device).cast(dtype)
            };
            let run = |linearised| {
                let [gate, up] = [&gate, &up].map(|v| tensor(v, &device).require_grad());
                let out = match linearised {
                    true => linearised_geglu(gate.clone(), up.clone()),
                    false => gelu_tanh(gate.clone()) * up.clone(),
                };
                assert_eq!(out.dtype(), dtype);
                let loss = (out.clone().cast(DType::F32) * tensor(&weights, &device).cast(DType::F32)).sum();
                let grads = loss.backward();
                let grad = |x: &Tensor<3>| x.grad(&grads).unwrap().try_to_vec_as::<f32>().unwrap();
                (out.inner().try_to_vec_as::<f32>().unwrap(), [grad(&gate), grad(&up)])
            };
            let fused = fused_geglu(tensor(&gate, &dev()), tensor(&up, &dev()));
            let (out, grads) = run(true);
            let fused = fused.try_to_vec_as::<f32>().unwrap();
            // Equal values; a GELU of -0 (from a tiny negative gate) becomes +0 by the added zero term.
            assert!(out.iter().zip(&fused).all(|(a, b)| a == b), "{dtype:?}: the fused values");
            let (_, eager) = run(false);
            // In half precision the gradients are rounded to the dtype, after one multiplication here and after
            // several in f32 there.
            let tolerance = if dtype == DType::F32 { 1e-6 } else { 4e-3 };
            for (name, (got, want)) in ["gate", "up"].iter().zip(grads.iter().zip(&eager)) {
                let err = relative_l1(got, want);
                assert!(err < tolerance, "{dtype:?}: d/d{name} differs by {err:.2e} (relative L1)");
            }
        }
    }

    #[test]
    fn a_linearised_geglu_slope_beyond_f16_saturates_and_keeps_the_value() {
        // gelu(1) · 65000 = 54,700 fits f16; the slope, gelu'(1) · 65000 = 70,000, does not. Left infinite, it
        // would turn the value NaN through `slope · 0`.
        let device = Device::flex().autodiff();
        let f16 = |v: f32| Tensor::<1>::from_data(TensorData::new(vec![v], [1]), (&device, DType::F16));
        let (gate, up) = (f16(1.0).require_grad(), f16(65000.0).require_grad());
        let out = linearised_geglu(gate.clone(), up);
        let value = out.clone().inner().try_to_vec_as::<f32>().unwrap()[0];
        assert!((value - 54_672.0).abs() < 64.0, "{value}");
        let grads = out.sum().backward();
        let slope = gate.grad(&grads).unwrap().try_to_vec_as::<f32>().unwrap()[0];
        assert_eq!(slope, half::f16::MAX.to_f32());
    }

    #[test]
    fn fused_kernels_under_autodiff_give_untracked_tensors_on_the_autodiff_device() {
        // Below the first adapter a training pass computes with the fused kernels on the CPU backend itself; their
        // results must come back as untracked tensors of the autodiff device, so that the adapters above can meet
        // them, and be the values prediction computes.
        let device = Device::flex().autodiff();
        let (q, k, v) = attention_inputs(DType::F32);
        let mask = || attention_mask(40, Some(7), &dev());
        let want = grouped_attention(Kernel::Fused, q.clone(), k.clone(), v.clone(), mask(), 0.25, Some(50.0));
        let [q, k, v] = [q, k, v].map(Tensor::autodiff);
        let got = grouped_attention(Kernel::Fused, q, k, v, mask().autodiff(), 0.25, Some(50.0));
        let geglu = fused_geglu(got.clone(), got.clone());
        for out in [&got, &geglu] {
            assert!(out.device().is_autodiff() && !out.is_tracked());
        }
        let (got, want) = (got.inner().try_to_vec_as::<f32>().unwrap(), want.try_to_vec_as::<f32>().unwrap());
        assert_eq!(max_difference(&got, &want), 0.0);
        // An adapter-like trainable weight over the fused output: its gradient flows, with no mixing of
        // checkpointing strategies.
        let w = Tensor::<4>::ones([1, 1, 16, 1], &device).require_grad();
        let grads = geglu.matmul(w.clone()).sum().backward();
        let grad = w.grad(&grads).expect("the weight has a gradient");
        assert!(grad.try_to_vec_as::<f32>().unwrap().iter().all(|g| g.is_finite() && *g != 0.0));
    }

    /// `gelu(x, approximate="tanh")` in f64.
    fn tanh_gelu(v: f64) -> f64 {
        0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh())
    }

    #[test]
    fn gelu_in_half_precision_is_computed_in_f32_and_rounded_once() {
        // The negative tail, where `1 + tanh` cancels in f16 (op by op, values from -3.6 down came out 0, and
        // -3.5 to -2.5 off by 1% to 39%), values either side of zero, and the cube's overflow of f16 past |x| = 40.3.
        let xs = [
            -8.0f32, -5.0, -4.0, -3.5, -3.0, -2.5, -1.0, -0.25, 0.25, 1.0, 2.5, 4.0, 41.0, -41.0,
            300.0, -300.0,
        ];
        // PyTorch's value for an input of the dtype: its kernel's arithmetic in f32 (where `1 + tanh` cancels too,
        // far later), rounded once; and the dtype's step (rounding can land on the other neighbour).
        let torch = |x: f32| {
            let inner = 0.797_884_6f32 * (x + 0.044715 * (x * x * x));
            0.5 * x * (1.0 + inner.tanh())
        };
        let f16 = |v: f32| half::f16::from_f32(v).to_f32();
        let bf16 = |v: f32| half::bf16::from_f32(v).to_f32();
        let cases: [(FloatDType, &dyn Fn(f32) -> f32, i32); 2] =
            [(FloatDType::F16, &f16, 10), (FloatDType::BF16, &bf16, 7)];
        for (dtype, round, mantissa) in cases {
            let x = Tensor::<1>::from_data(TensorData::new(xs.to_vec(), [xs.len()]), &dev())
                .cast(dtype);
            let out = gelu_tanh(x);
            assert_eq!(
                out.dtype(),
                DType::from(dtype),
                "the activation dtype is kept"
            );
            let got = out.try_to_vec_as::<f32>().unwrap();
            for (&x, &got) in xs.iter().zip(&got) {
                let want = round(torch(round(x)));
                let step = want.abs() * 2f32.powi(-mantissa);
                assert!(
                    (got - want).abs() <= step.max(6e-8),
                    "gelu({x}) in {dtype:?}: {got}, PyTorch gives {want}"
                );
            }
            assert!(
                got[2] < 0.0,
                "gelu(-4) = -7.0e-5 is representable in {dtype:?}, not 0"
            );
        }
    }

    #[test]
    fn geglu_uses_the_tanh_approximation_of_gelu() {
        let x = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, -0.5], [2]), &dev());
        let got = gelu_tanh(x.clone()).try_to_vec_as::<f32>().unwrap();
        let burns = burn::tensor::activation::gelu_approximate(x)
            .try_to_vec_as::<f32>()
            .unwrap();
        assert!((got[0] - burns[0]).abs() < 1e-6 && (got[1] - burns[1]).abs() < 1e-6);
        assert!((f64::from(got[0]) - tanh_gelu(1.0)).abs() < 1e-6);
        assert!((f64::from(got[1]) - tanh_gelu(-0.5)).abs() < 1e-6);
        // The erf GELU differs at this precision: 0.841345 vs 0.841192.
        assert!((f64::from(got[0]) - 0.841_344_7).abs() > 1e-4);
    }

    #[test]
    fn rope_rotates_dimension_i_with_i_plus_half() {
        let (seq, d) = (3, 4);
        let rope = Rope::new(seq, d, 10_000.0, &dev());
        let x: Vec<f32> = (0..seq * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let out = rope.apply(Tensor::<4>::from_data(
            TensorData::new(x.clone(), [1, seq, 1, d]),
            &dev(),
        ));
        let out = out.try_to_vec_as::<f32>().unwrap();
        for pos in 0..seq {
            for i in 0..d / 2 {
                let angle = pos as f64 / 10_000f64.powf((2 * i) as f64 / d as f64);
                let (a, b) = (f64::from(x[pos * d + i]), f64::from(x[pos * d + i + d / 2]));
                let (ra, rb) = (
                    a * angle.cos() - b * angle.sin(),
                    b * angle.cos() + a * angle.sin(),
                );
                assert!(
                    (f64::from(out[pos * d + i]) - ra).abs() < 1e-5,
                    "pos {pos} dim {i}"
                );
                assert!(
                    (f64::from(out[pos * d + i + d / 2]) - rb).abs() < 1e-5,
                    "pos {pos} dim {}",
                    i + d / 2
                );
            }
        }
    }

    #[test]
    fn attention_scale_comes_from_query_pre_attn_scalar() {
        let config = Gemma2Config {
            vocab_size: 8,
            ..Gemma2Config::tiny()
        };
        assert_ne!(config.query_pre_attn_scalar, config.head_dim as f64);
        let model = config.init(dev());
        assert_eq!(
            model.model.layers[0].self_attn.scale,
            config.query_pre_attn_scalar.powf(-0.5)
        );
        assert_eq!(
            model.model.layers[0].sliding_window,
            Some(config.sliding_window)
        );
        assert_eq!(model.model.layers[1].sliding_window, None);
    }

    #[test]
    fn a_capped_softmax_needs_no_shift_and_an_uncapped_one_keeps_it() {
        // Scores as soft-capping leaves them, at and near the cap of 50, with masked keys.
        let cap = 50.0;
        let data: Vec<f32> = vec![
            50.0, 49.9, -50.0, f32::NEG_INFINITY, // a row at the cap
            1.0, 2.0, 3.0, 4.0, //
            -50.0, -49.0, f32::NEG_INFINITY, f32::NEG_INFINITY, // everything but two keys hidden
        ];
        let scores = Tensor::<1>::from_floats(data.as_slice(), &dev()).reshape([1, 1, 1, 3, 4]);
        let got = vec(capped_softmax(scores.clone(), Some(cap), DType::F32).reshape([3, 4]));
        let want = vec(softmax(scores, 4).reshape([3, 4]));
        assert!(max_difference(&got, &want) < 1e-6, "{got:?} vs {want:?}");
        assert_eq!(got[3], 0.0, "a masked key gets nothing");
        // Past the bound, the shift comes back: unshifted, exp(95) is infinite and the row would be NaN.
        let big = Tensor::<1>::from_floats([95.0, 94.0], &dev()).reshape([1, 1, 1, 1, 2]);
        let got = vec(capped_softmax(big, Some(100.0), DType::F32).reshape([1, 2]));
        assert!(got.iter().all(|p| p.is_finite()), "{got:?}");
        assert!((got[0] - 1.0 / (1.0 + (-1f32).exp())).abs() < 1e-6, "{got:?}");
        // Where a gradient flows: the value and the gradient of the shifted softmax, in both the f32 form (the
        // shift kept) and the one for half-precision outputs (`s - ln Σ exp(s)`). `exp(s) / Σ exp(s)` would square
        // a sum of exp(50)s, which overflows, and lose the sum's share of the gradient (0 instead of its value).
        let device = Device::flex().autodiff();
        let run = |f: &dyn Fn(Tensor<5>) -> Tensor<5>| {
            let at_cap = Tensor::<1>::from_floats([50.0, 49.0, 48.0, 10.0, f32::NEG_INFINITY], &device).require_grad();
            let weights = Tensor::<1>::from_floats([1.0, -2.0, 0.5, 3.0, 7.0], &device).reshape([1, 1, 1, 1, 5]);
            let probs = f(at_cap.clone().reshape([1, 1, 1, 1, 5]));
            let grads = (probs.clone() * weights).sum().backward();
            let grad = at_cap.grad(&grads).unwrap().try_to_vec_as::<f32>().unwrap();
            (probs.inner().try_to_vec_as::<f32>().unwrap(), grad)
        };
        let (want_p, want_g) = run(&|s| softmax(s, 4));
        for out in [DType::F32, DType::F16, DType::BF16] {
            let (p, g) = run(&|s| capped_softmax(s, Some(cap), out));
            assert!(max_difference(&p, &want_p) < 1e-5, "{out:?}: {p:?} vs {want_p:?}");
            assert!(max_difference(&g, &want_g) < 1e-5, "{out:?}: {g:?} vs {want_g:?}");
            assert!(g.iter().all(|g| g.is_finite()), "{out:?}: {g:?}");
        }
    }

    #[test]
    fn soft_capping_bounds_scores_before_the_mask() {
        let config = Gemma2Config {
            vocab_size: 8,
            ..Gemma2Config::tiny()
        };
        let mut model = config.init(dev());
        let attn = &mut model.model.layers[1].self_attn;
        // Huge query/key weights: uncapped scores would make attention one-hot; capped at 5 they cannot.
        let big = |p: &Projection| {
            Projection::plain(Linear {
                weight: Param::from_tensor(p.weight().mul_scalar(400.0)),
                bias: None,
            })
        };
        attn.q_proj = big(&attn.q_proj);
        attn.k_proj = big(&attn.k_proj);
        let x = Tensor::<3>::random(
            [1, 6, 32],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &dev(),
        );
        let rope = Rope::new(6, 16, 10_000.0, &dev());
        let mask = attention_mask(6, None, &dev());
        let capped = attn.forward(x.clone(), &rope, mask.clone());
        attn.softcap = None;
        let uncapped = attn.forward(x, &rope, mask);
        let diff = vec((capped - uncapped).abs().reshape([1, 6 * 32]));
        assert!(
            diff.iter().any(|d| *d > 1e-3),
            "the cap must change the output"
        );
    }

    #[test]
    fn classifier_pools_the_last_real_token_of_each_row() {
        let config = Gemma2Config {
            vocab_size: 16,
            ..Gemma2Config::tiny()
        };
        let model = config.init(dev());
        let rows: [&[u32]; 2] = [&[2, 5, 6, 7, 1], &[2, 9, 1]];
        let batch = crate::batch::collate(&rows, 0);
        let together = vec(model.forward_batch(&batch, &dev()));
        for (i, row) in rows.iter().enumerate() {
            let alone = vec(model.forward_batch(&crate::batch::collate(&[row], 0), &dev()));
            for k in 0..2 {
                assert!(
                    (together[i * 2 + k] - alone[k]).abs() < 1e-5,
                    "row {i}: padding changed its logits"
                );
            }
        }
    }
}

/// Casts every float parameter (for half precision: `FloatDType::F16` or `BF16`).
struct CastFloats(FloatDType);

impl burn::module::ModuleMapper for CastFloats {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let dtype = self.0;
        // A packed weight stays packed: the quantized matmul produces the activation dtype.
        if matches!(param.val().dtype(), burn::tensor::DType::QFloat(_)) {
            return param;
        }
        param.map(move |t| {
            // On an autodiff device a cast is an operation: its result is a node of the graph (its gradient would
            // flow back to the f32 original), not a parameter, and it cannot be made trainable again. Detached,
            // the cast weight is a leaf, trainable or frozen like the original.
            let require_grad = t.is_require_grad();
            t.cast(dtype).detach().set_require_grad(require_grad)
        })
    }
}

impl Gemma2ForSequenceClassification {
    /// The model with its weights in `dtype`. Activations follow the weights; norms and softmax still compute in
    /// f32.
    ///
    /// A host-side embedding table (see [`super::placement`]) keeps its dtype: the CPU backend need not compute in
    /// half precision, and the forward pass casts the looked-up rows.
    pub fn cast(mut self, dtype: FloatDType) -> Self {
        let host = self.embedding_device();
        if host == self.model.norm.weight.device() {
            return self.map(&mut CastFloats(dtype));
        }
        let placeholder = Param::from_tensor(Tensor::zeros([1, 1], &host));
        let table = std::mem::replace(&mut self.model.embed_tokens, placeholder);
        self = self.map(&mut CastFloats(dtype));
        self.model.embed_tokens = table;
        self
    }
}
