//! How much arithmetic the classifier does, for throughput figures: model FLOPs per token and the peak rates of
//! known GPUs, which together give the model FLOPs utilisation (MFU) that `trainer train` logs and the GPU
//! benchmark prints.
//!
//! A multiply-add counts two FLOPs. Per token and layer, the forward pass does `2 N` for the layer's `N`
//! projection weights (adapters included) and `4 seq q` for attention (scores and the weighted sum over `seq`
//! positions, `q` = heads × head_dim). A LoRA step with a frozen base adds the backward pass only from the first
//! adapted layer up (nothing below it needs a gradient): `2 N` for the gradient of the activations through each
//! frozen weight, `2 N_lora` for the adapters' weight gradients, and `8 seq q` for attention. Embedding look-ups,
//! norms and elementwise work are not counted, as is usual for MFU.

use burn::tensor::Device;

use super::Gemma2ForSequenceClassification;

/// `(frozen projection weights, adapter weights)` of layer `layer`.
fn layer_params(model: &Gemma2ForSequenceClassification, layer: usize) -> (f64, f64) {
    let (mut base, mut lora) = (0.0, 0.0);
    for (_, p) in model.projections(layer) {
        let [d_in, d_out] = p.dims();
        base += (d_in * d_out) as f64;
        if let Some(l) = &p.lora {
            let [_, r] = l.lora_a.val().dims();
            lora += (r * (d_in + d_out)) as f64;
        }
    }
    (base, lora)
}

fn attention_width(model: &Gemma2ForSequenceClassification, layer: usize) -> f64 {
    let a = &model.model.layers[layer].self_attn;
    (a.num_heads * a.head_dim) as f64
}

/// FLOPs of the forward pass per token of a `seq`-token row.
pub fn forward_flops_per_token(model: &Gemma2ForSequenceClassification, seq: usize) -> f64 {
    (0..model.model.layers.len())
        .map(|l| {
            let (base, lora) = layer_params(model, l);
            2.0 * (base + lora) + 4.0 * seq as f64 * attention_width(model, l)
        })
        .sum()
}

/// FLOPs of a LoRA training step per token of a `seq`-token row: the forward pass, and the backward pass from
/// layer `first_trained` up (`None`: no layer has adapters, only the head trains).
pub fn training_flops_per_token(
    model: &Gemma2ForSequenceClassification,
    seq: usize,
    first_trained: Option<usize>,
) -> f64 {
    let backward: f64 = match first_trained {
        None => 0.0,
        Some(first) => (first..model.model.layers.len())
            .map(|l| {
                let (base, lora) = layer_params(model, l);
                2.0 * base + 4.0 * lora + 8.0 * seq as f64 * attention_width(model, l)
            })
            .sum(),
    };
    forward_flops_per_token(model, seq) + backward
}

/// The dense peak of a GPU this process runs on, TFLOP/s, in half precision (tensor cores, f32 accumulation) or
/// in f32, from its vendor's datasheet; `None` for an unknown device or the CPU.
pub fn known_peak_tflops(device: &Device, half: bool) -> Option<f64> {
    if !super::placement::is_gpu(device) {
        return None;
    }
    peak_tflops_by_name(&device.identity()?.name, half)
}

/// [`known_peak_tflops`] by the adapter's name (`NVIDIA H200`, `NVIDIA H100 PCIe`, ...).
pub fn peak_tflops_by_name(name: &str, half: bool) -> Option<f64> {
    // (name fragment, half, f32); the first match wins, so the PCIe H100 comes before the SXM part.
    const TABLE: [(&str, f64, f64); 7] = [
        ("H100 PCIe", 756.0, 51.0),
        ("H200", 989.0, 67.0),
        ("H100", 989.0, 67.0),
        ("A100", 312.0, 19.5),
        ("L40S", 362.0, 91.6),
        ("L4", 121.0, 30.3),
        ("RTX 4090", 165.2, 82.6),
    ];
    let (_, h, f) = TABLE.iter().find(|(n, _, _)| name.contains(n))?;
    Some(if half { *h } else { *f })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Gemma2Config;
    use crate::model::lora::LoraConfig;

    #[test]
    fn counts_follow_the_shapes() {
        let device = Device::flex();
        let config = Gemma2Config::tiny();
        let model = config.init(&device);
        let (h, q, kv, inter) = (32.0, 4.0 * 16.0, 2.0 * 16.0, 64.0);
        let per_layer = h * q + 2.0 * h * kv + q * h + 3.0 * h * inter;
        let layers = config.num_hidden_layers as f64;
        let fwd = forward_flops_per_token(&model, 100);
        assert_eq!(fwd, layers * (2.0 * per_layer + 4.0 * 100.0 * q));
        // Only the head trains: no backward through the layers.
        assert_eq!(training_flops_per_token(&model, 100, None), fwd);
        let lora = LoraConfig {
            r: 4,
            first_layer: 1,
            ..LoraConfig::default()
        };
        let adapted = model.with_lora(&lora, &device).unwrap();
        assert_eq!(adapted.first_adapted_layer(), Some(1));
        // r 4 on q, k and v of layers 1 to 3.
        let lora_params = 3.0 * 4.0 * ((h + q) + 2.0 * (h + kv));
        let fwd = forward_flops_per_token(&adapted, 100);
        assert_eq!(
            fwd,
            layers * (2.0 * per_layer + 4.0 * 100.0 * q) + 2.0 * lora_params
        );
        let train = training_flops_per_token(&adapted, 100, Some(1));
        assert_eq!(
            train - fwd,
            (layers - 1.0) * (2.0 * per_layer + 8.0 * 100.0 * q) + 4.0 * lora_params
        );
    }

    #[test]
    fn peaks_of_known_gpus() {
        assert_eq!(peak_tflops_by_name("NVIDIA H200", true), Some(989.0));
        assert_eq!(peak_tflops_by_name("NVIDIA H100 PCIe", true), Some(756.0));
        assert_eq!(
            peak_tflops_by_name("NVIDIA H100 80GB HBM3", false),
            Some(67.0)
        );
        assert_eq!(
            peak_tflops_by_name("llvmpipe (LLVM 19.1.7, 256 bits)", true),
            None
        );
        assert_eq!(known_peak_tflops(&Device::flex(), true), None);
    }
}
