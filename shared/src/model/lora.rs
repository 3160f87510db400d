//! LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021) on the classifier's projections.
//!
//! A frozen projection `W` learns a low-rank update: `h = x W + (alpha / r) * dropout(x) A B`, with `A` `[d_in, r]`
//! drawn at random and `B` `[r, d_out]` zero, so a fresh adapter leaves the model unchanged. Only the adapters and
//! the classification head train; everything else is frozen. After training, [`merge`] folds `(alpha / r) A B`
//! into `W`, and the model is a plain Gemma-2 classifier again.
//!
//! Parameter names follow PEFT (`...q_proj.lora_A.weight`, stored `[r, d_in]` like a PyTorch Linear), and each
//! trainable parameter gets a [`ParamId`] derived from its name, so optimizer state saved by one process finds
//! its parameter in the next (resuming a run).

use burn::module::{Module, Param, ParamId};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::quantization::{QuantScheme, QuantValue};
use burn::tensor::{Device, Distribution, Tensor};
use serde::{Deserialize, Serialize};

use super::config::Gemma2Config;
use super::gemma2::{Gemma2ForSequenceClassification, on_cpu};

/// The projections LoRA may adapt, by their Hugging Face names.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Which projections get adapters, and their shape. Defaults are the reference recipe's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank `r` of the update.
    pub r: usize,
    /// The update is scaled by `alpha / r`.
    pub alpha: f64,
    /// Dropout on the adapter's input during training.
    pub dropout: f64,
    /// Projection names (see [`PROJECTIONS`]).
    pub targets: Vec<String>,
    /// First adapted layer (the recipe adapts layers 6 to the last).
    pub first_layer: usize,
    /// Last adapted layer, inclusive; `None` is the model's last.
    pub last_layer: Option<usize>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 32,
            alpha: 64.0,
            dropout: 0.05,
            targets: vec!["q_proj".into(), "k_proj".into(), "v_proj".into()],
            first_layer: 6,
            last_layer: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("lora: unknown target {0:?}; choose from {PROJECTIONS:?}")]
    UnknownTarget(String),
    #[error("lora: rank r must be at least 1")]
    ZeroRank,
    #[error("lora: dropout {0} is outside [0, 1)")]
    Dropout(f64),
    #[error("lora: layers {first}..={last} select no layer of a {layers}-layer model")]
    NoLayers {
        first: usize,
        last: usize,
        layers: usize,
    },
}

impl LoraConfig {
    pub fn validate(&self, layers: usize) -> Result<(), LoraError> {
        if self.r == 0 {
            return Err(LoraError::ZeroRank);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(LoraError::Dropout(self.dropout));
        }
        if let Some(t) = self
            .targets
            .iter()
            .find(|t| !PROJECTIONS.contains(&t.as_str()))
        {
            return Err(LoraError::UnknownTarget(t.clone()));
        }
        let last = self.last_layer.unwrap_or(layers.saturating_sub(1));
        if self.first_layer > last || self.first_layer >= layers {
            return Err(LoraError::NoLayers {
                first: self.first_layer,
                last,
                layers,
            });
        }
        Ok(())
    }

    /// Whether layer `i` is adapted.
    pub fn covers(&self, i: usize) -> bool {
        i >= self.first_layer && self.last_layer.is_none_or(|l| i <= l)
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }
}

/// The low-rank update of one projection.
#[derive(Module, Debug)]
pub struct LoraAdapter {
    /// `[d_in, r]` (PEFT's `lora_A.weight` is its transpose).
    pub lora_a: Param<Tensor<2>>,
    /// `[r, d_out]` (PEFT's `lora_B.weight` is its transpose).
    pub lora_b: Param<Tensor<2>>,
    /// Only active on an autodiff device, with the module in training mode.
    pub dropout: Dropout,
    #[module(skip)]
    pub scale: f64,
}

impl LoraAdapter {
    /// A fresh adapter: `A` from PEFT's default (Kaiming-uniform with `a = sqrt(5)`, i.e. U(±1/sqrt(d_in))), `B`
    /// zero. `key` is the projection's name (`model.layers.6.self_attn.q_proj`), which fixes the parameter ids.
    pub fn new(key: &str, d_in: usize, d_out: usize, config: &LoraConfig, device: &Device) -> Self {
        let bound = 1.0 / (d_in as f64).sqrt();
        let a = Tensor::<2>::random(
            [d_in, config.r],
            Distribution::Uniform(-bound, bound),
            device,
        );
        let b = Tensor::<2>::zeros([config.r, d_out], device);
        Self::from_tensors(key, a, b, config)
    }

    pub fn from_tensors(key: &str, a: Tensor<2>, b: Tensor<2>, config: &LoraConfig) -> Self {
        Self {
            lora_a: trainable(&format!("{key}.lora_A.weight"), a),
            lora_b: trainable(&format!("{key}.lora_B.weight"), b),
            dropout: DropoutConfig::new(config.dropout).init(),
            scale: config.scale(),
        }
    }

    /// `scale * dropout(x) A B`, computed in the adapter's dtype and returned in `x`'s.
    ///
    /// # Shapes
    /// `x`: `[batch, seq, d_in]` → `[batch, seq, d_out]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let dtype = x.dtype();
        let a = self.lora_a.val();
        let x = self.dropout.forward(x).cast(a.dtype());
        x.matmul(a.unsqueeze())
            .matmul(self.lora_b.val().unsqueeze())
            .mul_scalar(self.scale)
            .cast(dtype)
    }

    /// [`forward`](Self::forward)'s output transposed, `scale · Bᵀ Aᵀ dropout(xᵀ)`, for
    /// [`Projection::forward_t`]: the base's layout throughout, so the sum with the base and, backward, the
    /// gradients of `xᵀ` meet tensors of their own layout and fuse with them. `x A B` with its output's transposed
    /// view added to the base instead (gradients of `A` and `B` in their own layout) ran those sums unfused, 98
    /// more kernels per step at gemma-2-2b's graph. The gradients of `A` and `B` here are transposed views, which
    /// the gradient norm reads in place (`train::clip_global_norm`).
    ///
    /// # Shapes
    /// `xt`: `[batch, d_in, seq]` → `[batch, d_out, seq]`
    pub fn forward_t(&self, xt: Tensor<3>) -> Tensor<3> {
        let dtype = xt.dtype();
        let a = self.lora_a.val();
        let xt = self.dropout.forward(xt).cast(a.dtype());
        let low = a.transpose().unsqueeze::<3>().matmul(xt); // [batch, r, seq]
        self.lora_b
            .val()
            .transpose()
            .unsqueeze::<3>()
            .matmul(low)
            .mul_scalar(self.scale)
            .cast(dtype)
    }

    /// The dense update `scale * A B`, `[d_in, d_out]`.
    pub fn delta(&self) -> Tensor<2> {
        self.lora_a
            .val()
            .matmul(self.lora_b.val())
            .mul_scalar(self.scale)
    }
}

/// `x @ w` for `x` `[batch, seq, d_in]` and `w` `[d_in, d_out]`, as one `[batch · seq, d_in] @ [d_in, d_out]`
/// product. burn's `Linear` gives the weight a leading axis of one for a batched product instead, and the CPU
/// backend reshapes a tensor that is not contiguous by copying it: every weight loaded from a checkpoint is the
/// transposed view of PyTorch's `[d_out, d_in]` (**[out, in] Linear**), so each projection copied its whole weight,
/// column by column, on every pass (14% of a one-row forward pass in `perf`). Its matmul reads the view in place.
/// Only on the CPU: on wgpu burn's fusion already avoids the copy, and this form launched 4 more kernels per
/// training step on lavapipe (605 against 601, `bench/kernels.sh`).
fn rows_times(x: Tensor<3>, w: Tensor<2>) -> Tensor<3> {
    let [batch, seq, d_in] = x.dims();
    let d_out = w.dims()[1];
    x.reshape([batch * seq, d_in]).matmul(w).reshape([batch, seq, d_out])
}

/// A bias-free projection, optionally with a LoRA adapter.
#[derive(Module, Debug)]
pub struct Projection {
    /// `[d_in, d_out]`.
    pub base: Linear,
    pub lora: Option<LoraAdapter>,
    /// The base weight is stored quantized ([`Projection::quantize_base`], or loaded packed from a web bundle).
    #[module(skip)]
    pub quantized: bool,
    /// The product takes the quantized weight as it is and the matmul kernel dequantizes it (burn's quantized
    /// matmul on a GPU): the f32 weight never exists. Off for training (the autodiff graph gets a plain matmul),
    /// on the CPU backend, whose quantized matmul does not compute the plain product (it was 4e-2 off in a
    /// probe, where wgpu's matched exactly), and on an emulated GPU, where it is several times slower (see
    /// [`crate::model::placement::Placement::software_adapter`]). Off, the weight is dequantized for each product
    /// and dropped after it: one projection's wide copy at a time.
    #[module(skip)]
    pub in_kernel: bool,
}

impl Projection {
    /// A projection without adapter; quantized if `base`'s weight is.
    pub fn plain(base: Linear) -> Self {
        let quantized = matches!(base.weight.val().dtype(), burn::tensor::DType::QFloat(_));
        Self {
            base,
            lora: None,
            quantized,
            in_kernel: false,
        }
    }

    /// # Shapes
    /// `x`: `[batch, seq, d_in]` → `[batch, seq, d_out]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let base = match self.quantized {
            true if self.in_kernel => x.clone().matmul(self.base.weight.val().unsqueeze()),
            // **QLoRA-style base**: stored in int8, dequantized for the product.
            true => {
                let w = self.weight().cast(x.dtype());
                x.clone().matmul(w.unsqueeze())
            }
            false if on_cpu(&x.device()) => rows_times(x.clone(), self.base.weight.val()),
            false => self.base.forward(x.clone()),
        };
        match &self.lora {
            Some(lora) => base + lora.forward(x),
            None => base,
        }
    }

    /// The projection of transposed activations, `Wᵀ xᵀ` plus the adapter's ([`LoraAdapter::forward_t`]), for
    /// attention's head-major layout on the GPU ([`Attention`](super::gemma2::Attention)): the output's rows are
    /// the projection's outputs, so `[batch, heads · head_dim, seq]` is `[batch, heads, head_dim, seq]` as it lies
    /// in memory, and each head is a matrix the matmul kernels read in place. `Wᵀ` is the checkpoint's own `[out,
    /// in]` (**[out, in] Linear**) and `xᵀ` a view of `x`: neither is copied.
    ///
    /// A weight packed for the matmul kernel ([`in_kernel`](Self::in_kernel)) is not transposed: its packing runs
    /// along `d_out`, which the kernel expects last. Then this is [`forward`](Self::forward) on `x` and the
    /// output's transposed view.
    ///
    /// # Shapes
    /// `xt`: `[batch, d_in, seq]` → `[batch, d_out, seq]`
    pub fn forward_t(&self, xt: Tensor<3>) -> Tensor<3> {
        if self.quantized && self.in_kernel {
            return self.forward(xt.swap_dims(1, 2)).swap_dims(1, 2);
        }
        let weight = match self.quantized {
            true => self.weight().cast(xt.dtype()),
            false => self.base.weight.val(),
        };
        let base = weight.transpose().unsqueeze::<3>().matmul(xt.clone());
        match &self.lora {
            Some(lora) => base + lora.forward_t(xt),
            None => base,
        }
    }

    /// `[d_in, d_out]`, dequantized if the base is quantized.
    pub fn weight(&self) -> Tensor<2> {
        match self.quantized {
            true => self.base.weight.val().dequantize(),
            false => self.base.weight.val(),
        }
    }

    /// Stores the frozen base weight quantized by `scheme` (QLoRA-style: the adapter stays in full precision).
    pub fn quantize_base(mut self, scheme: &QuantScheme) -> Self {
        let scheme = *scheme;
        self.base.weight = self
            .base
            .weight
            .map(move |w| w.quantize_dynamic(&scheme))
            .set_require_grad(false);
        self.quantized = true;
        self
    }

    /// Whether the base weight's `[d_in, d_out]` is packed for the GPU (see [`Projection::in_kernel`]).
    pub fn set_in_kernel(&mut self, on: bool) {
        self.in_kernel = on && self.quantized;
    }

    /// `[d_in, d_out]` of the weight.
    pub fn dims(&self) -> [usize; 2] {
        self.base.weight.val().dims()
    }

    /// Folds the adapter into the weight (in the weight's dtype; a quantized base comes out dequantized) and
    /// drops it.
    pub fn merge(self) -> Self {
        match &self.lora {
            None => self,
            Some(lora) => {
                let w = self.weight();
                let dtype = w.dtype();
                let merged = w + lora.delta().cast(dtype);
                Self::plain(Linear {
                    weight: Param::from_tensor(merged).set_require_grad(false),
                    bias: None,
                })
            }
        }
    }
}

/// A trainable parameter whose id is fixed by its name. `tensor` may be computed (a cast, a transpose): it is
/// detached first, since only a leaf of the autodiff graph can be made trainable.
pub fn trainable<const D: usize>(key: &str, tensor: Tensor<D>) -> Param<Tensor<D>> {
    let mut param = Param::from_tensor(tensor.detach());
    param.id = ParamId::from(name_id(key));
    param
}

/// FNV-1a of the name: a stable id across processes and platforms.
fn name_id(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Every projection of layer `layer` with its name: `(name, projection)`.
fn projections_mut(
    model: &mut Gemma2ForSequenceClassification,
    layer: usize,
) -> [(&'static str, &mut Projection); 7] {
    let l = &mut model.model.layers[layer];
    let (a, m) = (&mut l.self_attn, &mut l.mlp);
    [
        ("self_attn.q_proj", &mut a.q_proj),
        ("self_attn.k_proj", &mut a.k_proj),
        ("self_attn.v_proj", &mut a.v_proj),
        ("self_attn.o_proj", &mut a.o_proj),
        ("mlp.gate_proj", &mut m.gate_proj),
        ("mlp.up_proj", &mut m.up_proj),
        ("mlp.down_proj", &mut m.down_proj),
    ]
}

impl Gemma2ForSequenceClassification {
    /// Freezes the model, attaches fresh adapters where `config` says, and makes the head trainable.
    pub fn with_lora(self, config: &LoraConfig, device: &Device) -> Result<Self, LoraError> {
        config.validate(self.model.layers.len())?;
        let mut model = self.no_grad();
        // Gradients flow through plain matmuls only.
        model.set_in_kernel_dequantization(false);
        for i in 0..model.model.layers.len() {
            if !config.covers(i) {
                continue;
            }
            for (name, proj) in projections_mut(&mut model, i) {
                let short = name.rsplit('.').next().unwrap_or(name);
                if config.targets.iter().any(|t| t == short) {
                    let [d_in, d_out] = proj.dims();
                    let key = format!("model.layers.{i}.{name}");
                    proj.lora = Some(LoraAdapter::new(&key, d_in, d_out, config, device));
                }
            }
        }
        let weight = model.score.weight.val();
        model.score.weight = trainable("score.weight", weight);
        Ok(model)
    }

    /// Whether packed projection weights are dequantized inside the matmul kernel (see [`Projection::in_kernel`]).
    pub fn set_in_kernel_dequantization(&mut self, on: bool) {
        for i in 0..self.model.layers.len() {
            for (_, proj) in projections_mut(self, i) {
                proj.set_in_kernel(on);
            }
        }
    }

    /// Quantizes every projection's frozen base weight to int8 (symmetric, one scale per tensor): QLoRA-style
    /// training keeps the big frozen matrices at a quarter of their f32 size. Norms, embedding and head stay.
    pub fn quantize_base(mut self, device: &Device) -> Self {
        let scheme = device
            .settings()
            .quantization
            .scheme
            .with_value(QuantValue::Q8S);
        for i in 0..self.model.layers.len() {
            for (_, p) in projections_mut(&mut self, i) {
                let placeholder = Projection::plain(Linear {
                    weight: p.base.weight.clone(),
                    bias: None,
                });
                let mut owned = std::mem::replace(p, placeholder);
                if !owned.quantized {
                    owned = owned.quantize_base(&scheme);
                }
                *p = owned;
            }
        }
        self
    }

    /// The lowest layer with an adapter: the backward pass goes no further down.
    pub fn first_adapted_layer(&self) -> Option<usize> {
        (0..self.model.layers.len())
            .find(|&i| self.projections(i).iter().any(|(_, p)| p.lora.is_some()))
    }

    /// Every projection of layer `layer` with its name below the layer (`self_attn.q_proj`, ...).
    pub fn projections(&self, layer: usize) -> [(&'static str, &Projection); 7] {
        let l = &self.model.layers[layer];
        let (a, m) = (&l.self_attn, &l.mlp);
        [
            ("self_attn.q_proj", &a.q_proj),
            ("self_attn.k_proj", &a.k_proj),
            ("self_attn.v_proj", &a.v_proj),
            ("self_attn.o_proj", &a.o_proj),
            ("mlp.gate_proj", &m.gate_proj),
            ("mlp.up_proj", &m.up_proj),
            ("mlp.down_proj", &m.down_proj),
        ]
    }

    /// Folds every adapter into its projection ([`Projection::merge`]).
    pub fn merge_lora(mut self) -> Self {
        for layer in &mut self.model.layers {
            let a = &mut layer.self_attn;
            for p in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj] {
                take_merge(p);
            }
            let m = &mut layer.mlp;
            for p in [&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj] {
                take_merge(p);
            }
        }
        self
    }

    /// The trainable tensors by PEFT-style name (adapters `[r, d_in]` / `[d_out, r]`, head `[labels, hidden]`),
    /// as PyTorch stores them.
    pub fn trainable_tensors(&self) -> Vec<(String, Tensor<2>)> {
        let mut out = Vec::new();
        for i in 0..self.model.layers.len() {
            let named = self.projections(i);
            for (name, p) in named {
                if let Some(l) = &p.lora {
                    let key = format!("model.layers.{i}.{name}");
                    out.push((format!("{key}.lora_A.weight"), l.lora_a.val().transpose()));
                    out.push((format!("{key}.lora_B.weight"), l.lora_b.val().transpose()));
                }
            }
        }
        out.push(("score.weight".into(), self.score.weight.val().transpose()));
        out
    }

    /// Replaces the trainable tensors with `tensors` (names and layouts of [`Self::trainable_tensors`]), keeping
    /// each parameter's id and trainability. Returns the names this model has that `tensors` lacks.
    pub fn load_trainable(
        mut self,
        mut get: impl FnMut(&str, [usize; 2]) -> Option<Tensor<2>>,
    ) -> Result<Self, String> {
        let mut missing = Vec::new();
        let mut load = |name: String, param: &mut Param<Tensor<2>>| {
            let [r, c] = param.val().dims();
            match get(&name, [c, r]) {
                Some(t) => *param = trainable(&name, t.transpose()),
                None => missing.push(name),
            }
        };
        for i in 0..self.model.layers.len() {
            for (name, p) in projections_mut(&mut self, i) {
                if let Some(l) = &mut p.lora {
                    let key = format!("model.layers.{i}.{name}");
                    load(format!("{key}.lora_A.weight"), &mut l.lora_a);
                    load(format!("{key}.lora_B.weight"), &mut l.lora_b);
                }
            }
        }
        load("score.weight".into(), &mut self.score.weight);
        if missing.is_empty() {
            Ok(self)
        } else {
            Err(missing.join(", "))
        }
    }
}

fn take_merge(p: &mut Projection) {
    if p.lora.is_some() {
        let placeholder = Projection::plain(Linear {
            weight: p.base.weight.clone(),
            bias: None,
        });
        let owned = std::mem::replace(p, placeholder);
        *p = owned.merge();
    }
}

/// Parameter counts without building a model: `(trainable, total)` as PEFT prints them (adapters and head
/// trainable; total includes the adapters).
pub fn parameter_counts(config: &Gemma2Config, lora: &LoraConfig) -> (usize, usize) {
    let (h, d) = (config.hidden_size, config.head_dim);
    let (q, kv, inter) = (
        config.num_attention_heads * d,
        config.num_key_value_heads * d,
        config.intermediate_size,
    );
    let shapes = [
        ("q_proj", h, q),
        ("k_proj", h, kv),
        ("v_proj", h, kv),
        ("o_proj", q, h),
        ("gate_proj", h, inter),
        ("up_proj", h, inter),
        ("down_proj", inter, h),
    ];
    let per_layer_base: usize = shapes.iter().map(|(_, i, o)| i * o).sum::<usize>() + 4 * h;
    let per_layer_lora: usize = shapes
        .iter()
        .filter(|(n, _, _)| lora.targets.iter().any(|t| t == n))
        .map(|(_, i, o)| lora.r * (i + o))
        .sum();
    let layers = config.num_hidden_layers;
    let adapted = (0..layers).filter(|&i| lora.covers(i)).count();
    let head = h * config.num_labels();
    let base = config.vocab_size * h + layers * per_layer_base + h + head;
    let trainable = adapted * per_layer_lora + head;
    (trainable, base + adapted * per_layer_lora)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_projection_of_a_transposed_weight_is_burns_linear() {
        // A checkpoint's `[d_out, d_in]` weight, transposed as loading does; two rows of three tokens, so that a
        // wrong fold of batch and sequence would mix rows.
        let device = Device::flex();
        let dist = Distribution::Normal(0.0, 1.0);
        let weight = Tensor::<2>::random([5, 4], dist, &device).transpose();
        let x = Tensor::<3>::random([2, 3, 4], dist, &device);
        let projection = Projection::plain(Linear {
            weight: Param::from_tensor(weight),
            bias: None,
        });
        let got = projection.forward(x.clone()).try_to_vec_as::<f32>().unwrap();
        let want = projection.base.forward(x).try_to_vec_as::<f32>().unwrap();
        assert_eq!(got.len(), 2 * 3 * 5);
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "{worst}");
    }

    #[test]
    fn a_projection_of_transposed_activations_is_the_transposed_projection() {
        // Plain, with an adapter whose B is not zero, and with an int8 base dequantized for the product: `Wᵀ xᵀ`
        // (attention's head-major layout on the GPU) against `(x W)ᵀ`.
        let device = Device::flex();
        let dist = Distribution::Normal(0.0, 1.0);
        let config = LoraConfig {
            r: 3,
            ..LoraConfig::default()
        };
        let plain = Projection::plain(Linear {
            weight: Param::from_tensor(Tensor::<2>::random([5, 4], dist, &device).transpose()),
            bias: None,
        });
        let mut adapted = Projection::plain(plain.base.clone());
        adapted.lora = Some(LoraAdapter::from_tensors(
            "p",
            Tensor::random([4, 3], dist, &device),
            Tensor::random([3, 5], dist, &device),
            &config,
        ));
        let scheme = device.settings().quantization.scheme.with_value(QuantValue::Q8S);
        let quantized = Projection::plain(plain.base.clone()).quantize_base(&scheme);
        let x = Tensor::<3>::random([2, 3, 4], dist, &device);
        for (name, p) in [("plain", plain), ("adapted", adapted), ("int8", quantized)] {
            let want = p.forward(x.clone()).swap_dims(1, 2).try_to_vec_as::<f32>().unwrap();
            let got = p.forward_t(x.clone().swap_dims(1, 2));
            assert_eq!(got.dims(), [2, 5, 3], "{name}");
            let got = got.try_to_vec_as::<f32>().unwrap();
            // Relative to the largest output: the adapter's scale, alpha / r = 21, makes its outputs large.
            let largest = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst <= 1e-6 * largest, "{name}: {worst} of {largest}");
        }
    }

    #[test]
    fn recipe_settings_on_gemma2_2b_train_about_7_05m_parameters() {
        let (trainable, total) =
            parameter_counts(&Gemma2Config::gemma2_2b(), &LoraConfig::default());
        // q: 32 * (2304 + 2048), k and v: 32 * (2304 + 1024), on layers 6..=25; plus the 2304 x 2 head.
        assert_eq!(trainable, 20 * 32 * (3 * 2304 + 2048 + 2 * 1024) + 2 * 2304);
        assert_eq!(trainable, 7_049_728);
        // gemma-2-2b has 2.61B parameters with its embedding.
        assert!((2_600_000_000..2_630_000_000).contains(&total), "{total}");
    }

    #[test]
    fn config_rejects_unknown_targets_zero_rank_and_empty_layer_ranges() {
        let bad = LoraConfig {
            targets: vec!["qkv".into()],
            ..LoraConfig::default()
        };
        assert!(matches!(bad.validate(26), Err(LoraError::UnknownTarget(_))));
        let zero = LoraConfig {
            r: 0,
            ..LoraConfig::default()
        };
        assert!(matches!(zero.validate(26), Err(LoraError::ZeroRank)));
        assert!(matches!(
            LoraConfig::default().validate(4),
            Err(LoraError::NoLayers { .. })
        ));
        assert!(LoraConfig::default().validate(26).is_ok());
    }

    #[test]
    fn parameter_ids_come_from_names() {
        assert_eq!(name_id("score.weight"), name_id("score.weight"));
        assert_ne!(name_id("a.lora_A.weight"), name_id("a.lora_B.weight"));
    }
}
