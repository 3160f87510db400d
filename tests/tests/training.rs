//! LoRA and training on the CPU backend: adapters start as the identity, merging changes nothing, only adapters
//! and head learn, a tiny model memorises 32 real rows, and the export reloads to the same logits.

use std::sync::OnceLock;

use arena_judge_tests::{gemma, root, temp_dir, tokenizer_path};
use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};
use shared::batch::collate;
use shared::cache::{PreparedSplit, RowMeta};
use shared::data::{Format, Label, load_file};
use shared::model::lora::LoraConfig;
use shared::model::{Gemma2Config, Gemma2ForSequenceClassification, Placement};
use shared::preprocess::{PreprocessConfig, preprocess_record};
use shared::run_dir::{OpenMode, RunDir};
use shared::train::{Quiet, TrainConfig, TrainData, smoothed_cross_entropy, train};

fn config() -> Gemma2Config {
    Gemma2Config {
        sliding_window: 8,
        ..Gemma2Config::tiny()
    }
}

/// The first `n` binary rows of the bundled sample, cut to `max_length` tokens.
fn rows(n: usize, max_length: usize) -> PreparedSplit {
    static RECORDS: OnceLock<Vec<shared::data::Record>> = OnceLock::new();
    let records = RECORDS.get_or_init(|| {
        load_file(&root().join("data/arena-sample.parquet"), Format::Auto)
            .unwrap()
            .records
    });
    let pre = PreprocessConfig {
        prompt_tokens: max_length / 4,
        response_tokens: max_length / 2,
        max_length,
    };
    let mut split = PreparedSplit::with_capacity(n);
    for r in records
        .iter()
        .filter(|r| matches!(r.label, Some(Label::ModelA | Label::ModelB)))
        .take(n)
    {
        let e = preprocess_record(gemma(), &pre, r, false).unwrap();
        split.push(
            RowMeta {
                id: r.id.clone(),
                label: r.label.unwrap(),
                language: r.language.clone(),
                model_a: None,
                model_b: None,
                field_tokens: e.field_tokens,
                snipped: e.snipped,
                cut: e.cut,
            },
            &e.input_ids,
        );
    }
    split
}

fn logits(
    model: &Gemma2ForSequenceClassification,
    split: &PreparedSplit,
    device: &Device,
) -> Vec<f32> {
    let ids: Vec<&[u32]> = (0..split.len()).map(|i| split.input_ids(i)).collect();
    model
        .forward_batch(&collate(&ids, 0), device)
        .try_to_vec_as::<f32>()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn lora(r: usize) -> LoraConfig {
    LoraConfig {
        r,
        alpha: 2.0 * r as f64,
        dropout: 0.0,
        targets: ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]
            .map(String::from)
            .to_vec(),
        first_layer: 1,
        last_layer: None,
    }
}

/// Sets every adapter's B to random values, as training would.
fn perturb(
    mut model: Gemma2ForSequenceClassification,
    device: &Device,
) -> Gemma2ForSequenceClassification {
    for layer in &mut model.model.layers {
        let a = &mut layer.self_attn;
        for p in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj] {
            if let Some(l) = &mut p.lora {
                let dims = l.lora_b.val().dims();
                l.lora_b = Param::from_tensor(Tensor::random(
                    dims,
                    burn::tensor::Distribution::Normal(0.0, 0.3),
                    device,
                ));
            }
        }
    }
    model
}

#[test]
fn a_fresh_adapter_leaves_the_model_unchanged() {
    let device = Device::flex();
    let base = config().init(&device);
    let split = rows(4, 48);
    let before = logits(&base, &split, &device);
    let adapted = base.with_lora(&lora(4), &device).unwrap();
    assert!(adapted.model.layers[1].self_attn.q_proj.lora.is_some());
    assert!(
        adapted.model.layers[0].self_attn.q_proj.lora.is_none(),
        "layer 0 is below first_layer"
    );
    assert!(
        adapted.model.layers[1].mlp.gate_proj.lora.is_none(),
        "gate_proj is not a target"
    );
    assert!(max_diff(&before, &logits(&adapted, &split, &device)) < 1e-6);
    // A non-zero B does change the output: the comparison above could fail.
    let moved = perturb(adapted, &device);
    assert!(max_diff(&before, &logits(&moved, &split, &device)) > 1e-3);
}

#[test]
fn merged_weights_give_the_unmerged_logits() {
    let device = Device::flex();
    let model = perturb(
        config().init(&device).with_lora(&lora(8), &device).unwrap(),
        &device,
    );
    let split = rows(6, 64);
    let unmerged = logits(&model, &split, &device);
    let merged = model.merge_lora();
    assert!(
        merged
            .model
            .layers
            .iter()
            .all(|l| l.self_attn.q_proj.lora.is_none())
    );
    let d = max_diff(&unmerged, &logits(&merged, &split, &device));
    assert!(d < 1e-4, "merged logits differ by {d}");
}

/// Values of every float parameter, by id.
fn snapshot(
    model: &Gemma2ForSequenceClassification,
) -> Vec<(burn::module::ParamId, bool, Vec<f32>)> {
    struct Snap(Vec<(burn::module::ParamId, bool, Vec<f32>)>);
    impl burn::module::ModuleVisitor for Snap {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            let v = p.val().inner().try_to_vec_as::<f32>().unwrap();
            self.0.push((p.id, p.is_require_grad(), v));
        }
    }
    let mut s = Snap(Vec::new());
    model.visit(&mut s);
    s.0
}

#[test]
fn only_adapters_and_head_get_gradients_and_change() {
    let device = Device::flex().autodiff();
    let model = config().init(&device).with_lora(&lora(4), &device).unwrap();
    let before = snapshot(&model);
    let trainable: Vec<_> = before
        .iter()
        .filter(|(_, t, _)| *t)
        .map(|(id, _, _)| *id)
        .collect();
    // 3 layers x 5 targets x (A, B) + the head.
    assert_eq!(trainable.len(), 3 * 5 * 2 + 1);
    assert_eq!(trainable, shared::train::trainable_ids(&model));

    let split = rows(4, 48);
    let ids: Vec<&[u32]> = (0..split.len()).map(|i| split.input_ids(i)).collect();
    let labels: Vec<i32> = split.rows.iter().map(|r| r.label.index() as i32).collect();
    let out = model.forward_batch(&collate(&ids, 0), &device);
    let loss = smoothed_cross_entropy(
        out,
        Tensor::<1, Int>::from_data(TensorData::new(labels, [4]), &device),
        0.1,
    );
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    for (id, t, _) in &before {
        assert_eq!(
            grads.get::<2>(*id).is_some() || grads.get::<1>(*id).is_some(),
            *t,
            "param {id:?}"
        );
    }
    let mut optim = burn::optim::AdamWConfig::new().init();
    let model = optim.step(1e-2, model, grads);
    let after = snapshot(&model);
    for ((id, t, a), (_, _, b)) in before.iter().zip(&after) {
        let changed = max_diff(a, b) > 0.0;
        if *t {
            // B starts at zero and A's gradient is zero while B is: after one step B and the head have moved.
            continue;
        }
        assert!(!changed, "frozen parameter {id:?} changed");
    }
    let moved = before
        .iter()
        .zip(&after)
        .filter(|((_, t, a), (_, _, b))| *t && max_diff(a, b) > 0.0)
        .count();
    assert!(moved > 3 * 5, "every B and the head move; {moved} moved");
}

/// Layers below the first adapter depend on no trainable parameter, so a LoRA step on the CPU computes them with
/// the fused kernels prediction uses, untracked (`Kernel::for_inputs`), and the layers with adapters with the same
/// host passes linearised for autodiff. A trainable embedding makes every layer's activations tracked, and so every
/// layer linearised: same values, so the adapters' gradients must agree to the bit. And on wgpu every layer is
/// computed op by op and differentiated by autodiff, as transformers does: the loss and the gradients agree with
/// that within f32 rounding, for a sliding and a global layer below the adapters and two with them.
#[test]
fn layers_below_the_first_adapter_change_no_gradient() {
    let device = Device::flex().autodiff();
    let adapters = LoraConfig {
        first_layer: 2,
        ..lora(4)
    };
    let model = perturb(config().init(&device).with_lora(&adapters, &device).unwrap(), &device);
    let trainable = shared::train::trainable_ids(&model);
    let split = rows(4, 48);
    let ids: Vec<&[u32]> = (0..split.len()).map(|i| split.input_ids(i)).collect();
    let labels: Vec<i32> = split.rows.iter().map(|r| r.label.index() as i32).collect();
    let step = |model: &Gemma2ForSequenceClassification, device: &Device| {
        let out = model.forward_batch(&collate(&ids, 0), device);
        let labels = Tensor::<1, Int>::from_data(TensorData::new(labels.clone(), [4]), device);
        let loss = smoothed_cross_entropy(out, labels, 0.1);
        let value = loss.clone().inner().try_to_vec_as::<f32>().unwrap()[0];
        let grads = GradientsParams::from_grads(loss.backward(), model);
        let embedding = grads.get::<2>(model.model.embed_tokens.id).is_some();
        let mut gradient = Vec::new();
        for id in &trainable {
            // The adapters' matrices, and the head's weight.
            let g = match grads.get::<2>(*id) {
                Some(g) => g.try_to_vec_as::<f32>(),
                None => grads.get::<1>(*id).unwrap().try_to_vec_as::<f32>(),
            };
            gradient.extend(g.unwrap());
        }
        (value, gradient, embedding)
    };
    let (loss, gradient, embedding) = step(&model, &device);
    assert!(!embedding, "the embedding is frozen");
    let mut tracked = model.clone();
    tracked.model.embed_tokens = tracked.model.embed_tokens.set_require_grad(true);
    let (tracked_loss, tracked_gradient, embedding) = step(&tracked, &device);
    assert!(embedding, "a trainable embedding is tracked through every layer");
    assert_eq!(loss.to_bits(), tracked_loss.to_bits());
    assert!(gradient.iter().zip(&tracked_gradient).all(|(a, b)| a.to_bits() == b.to_bits()));
    let gpu = Device::wgpu(Default::default()).autodiff();
    // `fork` keeps which parameters are trainable, as leaves on the new device.
    let (eager_loss, eager_gradient, _) = step(&model.clone().fork(&gpu), &gpu);
    assert!((loss - eager_loss).abs() < 1e-5, "loss {loss} against {eager_loss} all eager");
    let err = relative_l1(&gradient, &eager_gradient);
    assert!(err < 1e-4, "the gradient differs by {err:.2e} (relative L1) from the eager one");
}

#[test]
fn a_tiny_model_memorises_32_training_rows() {
    let device = Device::flex().autodiff();
    device.seed(7);
    let model = config().init(&device);
    let split = rows(32, 64);
    let run = temp_dir("overfit-run");
    let config = TrainConfig {
        lora: LoraConfig {
            first_layer: 0,
            ..lora(8)
        },
        learning_rate: 1e-2,
        batch_size: 8,
        grad_accum: 1,
        epochs: 40.0,
        warmup_ratio: 0.05,
        label_smoothing: 0.0,
        logging_steps: 10,
        eval_steps: 40,
        save_steps: 1000,
        early_stopping_patience: None,
        eval_batch_size: 32,
        ..TrainConfig::default()
    };
    let trained = train(
        model,
        &config,
        TrainData {
            train: &split,
            val: &split,
        },
        &RunDir::open(&run, OpenMode::New).unwrap(),
        &device,
        &Quiet,
    )
    .unwrap();
    let best = trained.state.best_accuracy.unwrap();
    assert!(
        best >= 0.95,
        "training accuracy {best}; evals {:?}",
        trained.evals.iter().map(|e| e.accuracy).collect::<Vec<_>>()
    );
    // The returned model is the best one.
    let m = shared::train::evaluate_split(&trained.model.valid(), &split, &config, &Device::flex())
        .unwrap();
    assert_eq!(m.accuracy, best);
    // The loss went down and the log has one line per logging step and per evaluation.
    let first = trained.logs.first().unwrap().loss;
    let last = trained.logs.last().unwrap().loss;
    assert!(last < first * 0.5, "loss {first} → {last}");
    let (logs, evals) = shared::train::read_log(&run.join("log.jsonl")).unwrap();
    assert_eq!((logs.len(), evals.len()), (16, 4));
}

/// `model` (merged) exported to `out` with every compact format beside f16.
fn export_all_formats(
    model: &Gemma2ForSequenceClassification,
    out: &std::path::Path,
) -> shared::export::Exported {
    use shared::export::{WeightFormat, hf_tensors, serialize_all};
    let tensors = hf_tensors(model).unwrap();
    shared::export::export(
        &tensors,
        &config(),
        &tokenizer_path(),
        &PreprocessConfig::default(),
        out,
        serialize_all(&tensors, &[WeightFormat::Int8, WeightFormat::Q4]).unwrap(),
        None,
    )
    .unwrap()
}

#[test]
fn export_reloads_to_the_same_logits_in_every_format() {
    let device = Device::flex();
    let model = perturb(
        config().init(&device).with_lora(&lora(8), &device).unwrap(),
        &device,
    );
    let merged = model.merge_lora();
    let split = rows(5, 64);
    let want = logits(&merged, &split, &device);
    let out = temp_dir("export");
    let exported = export_all_formats(&merged, &out);
    let hf = shared::model::load::load_hf_dir(&out.join("hf"), &device).unwrap();
    assert!(!hf.fresh_head);
    assert_eq!(hf.config.sliding_window, 8);
    let d = max_diff(&want, &logits(&hf.model, &split, &device));
    assert!(d < 1e-4, "HF export differs by {d}");

    let manifest = shared::export::verify_bundle(&out.join("web")).unwrap();
    assert_eq!(manifest, exported.bundle);
    assert_eq!(manifest.weights.len(), 3);
    let web = out.join("web");
    let config_json = std::fs::read(web.join("config.json")).unwrap();
    for (file, tolerance) in [
        ("model.f16.safetensors", 5e-2),
        ("model.int8.safetensors", 0.25),
        ("model.q4.safetensors", 1.0),
    ] {
        let c = Gemma2Config::from_hf_json("config.json", &config_json).unwrap();
        let ckpt = shared::model::weights::Checkpoint::from_files(vec![(
            file.into(),
            std::fs::read(web.join(file)).unwrap(),
        )])
        .unwrap();
        let loaded = shared::model::load::from_checkpoint(c, &ckpt, &device).unwrap();
        let d = max_diff(&want, &logits(&loaded.model, &split, &device));
        assert!(d < tolerance, "{file} differs by {d}");
    }
    // A damaged file is caught by its hash.
    std::fs::write(web.join("config.json"), b"{}").unwrap();
    let e = shared::export::verify_bundle(&web).unwrap_err().to_string();
    assert!(
        e.contains("config.json") && e.contains("does not match"),
        "{e}"
    );
}

#[test]
fn training_steps_run_on_wgpu_and_lower_the_loss() {
    let device = Device::wgpu(Default::default()).autodiff();
    wgpu_training_lowers_the_loss(Placement::from(&device));
}

#[test]
fn training_on_wgpu_with_the_embedding_in_host_memory() {
    // The table goes to the CPU backend (over a 1 KiB binding limit): gradients must still reach the adapters on
    // the GPU through the host-to-device copy of the looked-up rows.
    let device = Device::wgpu(Default::default()).autodiff();
    wgpu_training_lowers_the_loss(Placement::new(device, Some(1024)));
}

fn wgpu_training_lowers_the_loss(placement: Placement) {
    let device = placement.compute.clone();
    device.seed(3);
    let small = Gemma2Config {
        vocab_size: 512,
        ..config()
    };
    let host = !placement.fits(512 * small.hidden_size as u64 * 4);
    let model = small.init(placement).with_lora(&lora(4), &device).unwrap();
    assert_eq!(model.embedding_device() == Device::flex(), host);
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 % 500 + 2) as u32).collect();
    let batch = collate(&[&ids[..24], &ids[..16]], 0);
    let labels = Tensor::<1, Int>::from_data(TensorData::new(vec![0i32, 1], [2]), &device);
    let mut optim = burn::optim::AdamWConfig::new().init();
    let mut losses = Vec::new();
    let mut model = model;
    // Small steps on one batch: each must lower its loss (a large learning rate could overshoot).
    for _ in 0..5 {
        let loss =
            smoothed_cross_entropy(model.forward_batch(&batch, &device), labels.clone(), 0.1);
        losses.push(loss.clone().inner().try_to_vec_as::<f32>().unwrap()[0]);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(3e-3, model, grads);
    }
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(
        losses.windows(2).all(|w| w[1] < w[0]),
        "wgpu training does not lower the loss: {losses:?}"
    );
}

#[test]
fn a_quantized_base_trains_and_merges_to_the_same_logits() {
    let device = Device::flex().autodiff();
    let full = config().init(&device).with_lora(&lora(4), &device).unwrap();
    let split = rows(4, 48);
    let plain = Device::flex();
    let reference = logits(&full.valid(), &split, &plain);
    let model = full.quantize_base(&device);
    assert!(model.model.layers[0].mlp.up_proj.quantized);
    let quantized = logits(&model.valid(), &split, &plain);
    // int8 per tensor: close to the f32 model, but not equal.
    let d = max_diff(&reference, &quantized);
    assert!(d > 0.0 && d < 5e-2, "int8 base moved the logits by {d}");

    let ids: Vec<&[u32]> = (0..split.len()).map(|i| split.input_ids(i)).collect();
    let labels: Vec<i32> = split.rows.iter().map(|r| r.label.index() as i32).collect();
    let labels = Tensor::<1, Int>::from_data(TensorData::new(labels, [4]), &device);
    let mut optim = burn::optim::AdamWConfig::new().init();
    let mut model = model;
    for _ in 0..2 {
        let loss = smoothed_cross_entropy(
            model.forward_batch(&collate(&ids, 0), &device),
            labels.clone(),
            0.1,
        );
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    let trained = model.valid();
    let unmerged = logits(&trained, &split, &plain);
    let merged = logits(&trained.merge_lora(), &split, &plain);
    let d = max_diff(&unmerged, &merged);
    assert!(d < 1e-4, "merging onto the dequantized base differs by {d}");
}

/// Fresh adapters and head by name, as [`Gemma2ForSequenceClassification::trainable_tensors`] gives them.
type Adapters = Vec<(String, Tensor<2>)>;

/// Losses of `steps` optimizer steps of `shared::train::train_step` (what `trainer train` runs) on the same two
/// micro-batches, from `base` in `precision` with the adapters `start` (or fresh ones); also whether every
/// trained value stayed finite, and the adapters it started from.
fn losses_in(
    base: Gemma2ForSequenceClassification,
    precision: shared::train::Precision,
    start: Option<&Adapters>,
    device: &Device,
    steps: usize,
) -> (Vec<f32>, bool, Adapters) {
    use shared::train::{for_training, train_step, trainable_ids};
    let split = rows(4, 48);
    let train_config = TrainConfig {
        lora: LoraConfig {
            dropout: 0.0,
            ..lora(4)
        },
        precision,
        learning_rate: 3e-3,
        ..TrainConfig::default()
    };
    let mut model = for_training(base, &train_config, device).unwrap();
    // The device's RNG is shared with tests running beside this one: copy the adapters rather than re-seed.
    if let Some(start) = start {
        model = with_adapters(model, start);
    }
    let adapters = model.trainable_tensors();
    let trainable = trainable_ids(&model);
    let mut scaler = train_config.loss_scaler(device);
    let mut optim = burn::optim::AdamWConfig::new().init();
    let micro = [vec![0, 1], vec![2, 3]];
    let mut losses = Vec::new();
    for step in 0..steps {
        let out;
        (model, out) = train_step(
            model,
            &mut optim,
            &micro,
            &split,
            &train_config,
            step,
            3e-3,
            &trainable,
            scaler.as_mut(),
            device,
        )
        .unwrap();
        losses.push(out.loss.try_to_vec_as::<f32>().unwrap()[0]);
    }
    let finite = snapshot(&model.valid())
        .iter()
        .all(|(_, _, v)| v.iter().all(|x| x.is_finite()));
    (losses, finite, adapters)
}

/// The adapters' gradient of one `train_step` in `train_config`'s precision, from `base` with the adapters `start`: SGD at
/// learning rate 1 makes each trainable value's change its gradient. Also how often the step overflowed and the
/// loss scale after it (`None` without a scaler).
fn one_step_gradient(
    base: Gemma2ForSequenceClassification,
    train_config: &TrainConfig,
    start: &Adapters,
    device: &Device,
) -> (Vec<f32>, usize, Option<f64>) {
    let (gradient, out, scale) = step_gradient(
        base,
        train_config,
        start,
        device,
        &[vec![0, 1], vec![2, 3]],
        &rows(4, 48),
    );
    (gradient, out.overflows, scale)
}

/// [`one_step_gradient`] on the micro-batches `micro` of `split`, with the step's output (loss, shapes, overflows).
fn step_gradient(
    base: Gemma2ForSequenceClassification,
    train_config: &TrainConfig,
    start: &Adapters,
    device: &Device,
    micro: &[Vec<usize>],
    split: &PreparedSplit,
) -> (Vec<f32>, shared::train::StepOutput, Option<f64>) {
    use shared::train::{for_training, train_step, trainable_ids};
    let mut model = with_adapters(for_training(base, train_config, device).unwrap(), start);
    let before = model.trainable_tensors();
    let trainable = trainable_ids(&model);
    let mut scaler = train_config.loss_scaler(device);
    let mut optim = burn::optim::SgdConfig::new().init();
    let out;
    (model, out) = train_step(
        model,
        &mut optim,
        micro,
        split,
        train_config,
        0,
        1.0,
        &trainable,
        scaler.as_mut(),
        device,
    )
    .unwrap();
    let after = model.trainable_tensors();
    let mut gradient = Vec::new();
    // The adapters' gradients only: the head's is computed in f32 from the last hidden state and is far larger.
    for ((name, b), (_, a)) in before
        .iter()
        .zip(&after)
        .filter(|((n, _), _)| n.contains("lora"))
    {
        let b = b.clone().inner().try_to_vec_as::<f32>().unwrap();
        let a = a.clone().inner().try_to_vec_as::<f32>().unwrap();
        assert_eq!(b.len(), a.len(), "{name}");
        gradient.extend(b.iter().zip(&a).map(|(b, a)| b - a));
    }
    (gradient, out, scaler.map(|s| s.scale))
}

/// A step's rows regrouped by `micro_batch_tokens` (one batch of 5, or batches of 2, 2 and 1 padded to their
/// longest row) give the loss and gradient of the rows one by one, the recipe's batch 1 × accumulation: the loss
/// is the mean over the step's rows however they are grouped, and right padding changes no real token.
#[test]
fn packing_a_step_by_tokens_leaves_its_loss_and_gradient_unchanged() {
    let device = Device::flex().autodiff();
    let base = config().init(&device);
    // Rows of different lengths, so a packed batch pads.
    let full = rows(5, 48);
    let mut split = PreparedSplit::with_capacity(5);
    for (i, keep) in [48, 21, 40, 9, 33].into_iter().enumerate() {
        let ids = full.input_ids(i);
        split.push(full.rows[i].clone(), &ids[..keep.min(ids.len())]);
    }
    let lengths: Vec<usize> = (0..5).map(|i| split.input_ids(i).len()).collect();
    assert!(lengths.iter().any(|&l| l != lengths[0]), "{lengths:?}");
    let settings = |micro_batch_tokens| TrainConfig {
        lora: lora(4),
        max_grad_norm: None,
        micro_batch_tokens,
        ..TrainConfig::default()
    };
    let start = perturb(
        shared::train::for_training(base.clone(), &settings(0), &device).unwrap(),
        &device,
    )
    .trainable_tensors();
    let one_by_one: Vec<Vec<usize>> = (0..5).map(|i| vec![i]).collect();
    let step = |micro_batch_tokens| {
        let (gradient, out, _) = step_gradient(
            base.clone(),
            &settings(micro_batch_tokens),
            &start,
            &device,
            &one_by_one,
            &split,
        );
        let loss = out.loss.try_to_vec_as::<f32>().unwrap()[0];
        (gradient, loss, out.shapes)
    };
    let (reference, reference_loss, shapes) = step(0);
    assert_eq!(shapes.len(), 5, "budget 0 regrouped the rows: {shapes:?}");
    assert!(reference.iter().any(|g| *g != 0.0));
    let longest = *lengths.iter().max().unwrap();
    for budget in [5 * longest, 2 * longest] {
        let (gradient, loss, shapes) = step(budget);
        let batches: Vec<usize> = shapes.iter().map(|&(rows, _)| rows).collect();
        let expected = if budget == 5 * longest {
            vec![5]
        } else {
            vec![2, 2, 1]
        };
        assert_eq!(batches, expected, "budget {budget}: {shapes:?}");
        assert!(shapes.iter().all(|&(rows, seq)| rows * seq <= budget));
        assert!(
            (loss - reference_loss).abs() < 1e-6,
            "budget {budget}: loss {loss} against {reference_loss} row by row"
        );
        let err = relative_l1(&gradient, &reference);
        assert!(
            err < 1e-5,
            "budget {budget}: the gradient differs by {err:.2e} (relative L1)"
        );
    }
}

/// How far `g` is from `reference`, relative to the reference's size (L1).
fn relative_l1(g: &[f32], reference: &[f32]) -> f64 {
    let diff: f64 = g
        .iter()
        .zip(reference)
        .map(|(a, b)| f64::from((a - b).abs()))
        .sum();
    diff / reference.iter().map(|b| f64::from(b.abs())).sum::<f64>()
}

/// Gradients through an f16 base are often below f16's normal range (6e-5) and lose digits or vanish; scaling
/// the loss (by 65536, as PyTorch's GradScaler starts) keeps them, so an f16 step's gradient is much closer to
/// the f32 one with scaling than without.
#[test]
fn f16_loss_scaling_keeps_the_gradients_f16_would_round_away() {
    use shared::train::Precision;
    let device = Device::flex().autodiff();
    let mut base = config().init(&device);
    // A 32-wide model's gradients are large; gemma-2-2b's, 2304 wide and 26 layers deep, are mostly far below
    // f16's normal range. A head with small weights puts this model's gradients there too (everything below
    // the head is multiplied by them).
    base.score.weight = Param::from_tensor(base.score.weight.val().mul_scalar(1e-3).detach());
    let settings = |precision, loss_scaling| TrainConfig {
        lora: lora(4),
        precision,
        loss_scaling,
        max_grad_norm: None,
        ..TrainConfig::default()
    };
    let start = perturb(
        shared::train::for_training(base.clone(), &settings(Precision::F32, false), &device)
            .unwrap(),
        &device,
    )
    .trainable_tensors();
    let (full, ..) = one_step_gradient(
        base.clone(),
        &settings(Precision::F32, true),
        &start,
        &device,
    );
    let (plain, plain_overflows, no_scale) = one_step_gradient(
        base.clone(),
        &settings(Precision::F16, false),
        &start,
        &device,
    );
    let (scaled, overflows, scale) =
        one_step_gradient(base, &settings(Precision::F16, true), &start, &device);
    assert_eq!(
        (plain_overflows, no_scale),
        (0, None),
        "loss scaling was switched off"
    );
    // This small random model's gradients overflow f16 at 65536 (as a real model's may): the step was computed
    // again at each halved scale until it fit.
    assert_eq!(scale, Some(65536.0 / 2f64.powi(overflows as i32)));
    eprintln!("the first step overflowed {overflows} times; the loss scale is {scale:?}");
    assert!(full.iter().any(|g| *g != 0.0));
    let (plain_err, scaled_err) = (relative_l1(&plain, &full), relative_l1(&scaled, &full));
    eprintln!("f16 gradient vs f32: {plain_err:.2e} unscaled, {scaled_err:.2e} scaled");
    // Measured: 0.25 unscaled (a quarter of the gradient lost), 1.5e-3 scaled (f16's rounding).
    assert!(
        scaled_err < 1e-2 && scaled_err < plain_err / 10.0,
        "scaling did not help: {plain_err:.2e} unscaled, {scaled_err:.2e} scaled"
    );
}

/// A loss scale so large that the f16 gradients overflow: the scale halves until they fit, and the step then
/// made is exactly the one a run starting at that scale makes (no rows dropped, no update from the overflowed
/// tries).
#[test]
fn an_overflowing_f16_step_is_computed_again_at_half_the_scale() {
    use shared::train::Precision;
    let device = Device::flex().autodiff();
    let base = config().init(&device);
    let settings = TrainConfig {
        lora: lora(4),
        precision: Precision::F16,
        initial_loss_scale: 2f64.powi(60),
        ..TrainConfig::default()
    };
    let start = perturb(
        shared::train::for_training(base.clone(), &settings, &device).unwrap(),
        &device,
    )
    .trainable_tensors();
    let (gradient, overflows, scale) = one_step_gradient(base.clone(), &settings, &start, &device);
    assert!(
        overflows >= 40,
        "a 2^60 loss scale overflowed f16 only {overflows} times"
    );
    let fitting = scale.unwrap();
    assert_eq!(fitting, 2f64.powi(60 - overflows as i32));
    let direct = TrainConfig {
        initial_loss_scale: fitting,
        ..settings
    };
    let (expected, again, _) = one_step_gradient(base, &direct, &start, &device);
    assert_eq!(again, 0);
    assert!(gradient.iter().any(|g| *g != 0.0));
    assert!(
        max_diff(&gradient, &expected) == 0.0,
        "the retried step differs from a direct one by {}",
        max_diff(&gradient, &expected)
    );
}

/// `model` with its adapters and head set to `start`, by name.
fn with_adapters(
    model: Gemma2ForSequenceClassification,
    start: &Adapters,
) -> Gemma2ForSequenceClassification {
    model
        .load_trainable(|name, _| {
            start
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.clone())
        })
        .unwrap()
}

/// f16 training (the default on a GPU) against f32: the first step's loss agrees, the loss falls over the
/// steps, and nothing becomes NaN or infinite. On the H200 this path panicked at step 1 (a cast parameter was
/// made trainable while it was still a node of the autodiff graph).
fn half_precision_trains_like_f32(device: &Device, precision: shared::train::Precision) {
    use shared::train::Precision;
    // One base for both: built once and cloned.
    let base = config().init(device);
    let (full, full_finite, adapters) = losses_in(base.clone(), Precision::F32, None, device, 4);
    let (half, half_finite, _) = losses_in(base, precision, Some(&adapters), device, 4);
    assert!(
        full_finite && half_finite,
        "non-finite weights after training"
    );
    assert!(
        half.iter().all(|l| l.is_finite()),
        "{precision:?} losses {half:?}"
    );
    assert!(
        (half[0] - full[0]).abs() < 2e-2,
        "first {precision:?} step's loss {} vs f32 {}",
        half[0],
        full[0]
    );
    assert!(
        half[3] < half[0] && full[3] < full[0],
        "the loss does not fall: {precision:?} {half:?}, f32 {full:?}"
    );
    // The runs follow the same course. They part slowly: f16 rounds the gradients through the frozen base, and
    // AdamW turns a gradient's sign, not its size, into a step, so a rounded small gradient moves its weight as
    // far as an exact one (measured on the CPU: 0.06 apart after four steps at this learning rate).
    for (h, f) in half.iter().zip(&full) {
        assert!(
            (h - f).abs() < 0.1,
            "{precision:?} {half:?} drifts from f32 {full:?}"
        );
    }
}

#[test]
fn half_precision_training_on_the_cpu() {
    half_precision_trains_like_f32(&Device::flex().autodiff(), shared::train::Precision::F16);
}

/// bf16 on the CPU backend trains as f16 does; lavapipe reports no bf16 (in SPIR-V as in WGSL), so there
/// `--precision bf16` is an error that says what to use instead (if the adapter ever reports bf16, this fails and
/// the wgpu case must train).
#[test]
fn bf16_training_on_the_cpu_and_a_clear_error_on_wgpu() {
    use shared::train::Precision;
    half_precision_trains_like_f32(&Device::flex().autodiff(), Precision::Bf16);
    let gpu = Device::wgpu(Default::default()).autodiff();
    assert!(!gpu.supports_dtype(burn::tensor::FloatDType::BF16));
    let bf16 = TrainConfig {
        precision: Precision::Bf16,
        ..TrainConfig::default()
    };
    let Err(e) = shared::train::for_training(config().init(&gpu), &bf16, &gpu) else {
        panic!("bf16 on wgpu was accepted");
    };
    assert!(
        e.to_string()
            .contains("does not support bf16: train with --precision f32 or f16"),
        "{e}"
    );
}

#[test]
fn half_precision_training_on_wgpu() {
    let device = Device::wgpu(Default::default()).autodiff();
    // lavapipe supports f16, so `auto` must choose it there, as it does on a real GPU; the test would have to
    // force f16 (and say so) on an adapter without it.
    let auto = TrainConfig::default();
    assert!(
        device.supports_dtype(burn::tensor::FloatDType::F16),
        "this wgpu adapter has no f16: the f16 path is not exercised"
    );
    assert!(auto.half(&device), "{}", auto.resolve_precision(&device).1);
    half_precision_trains_like_f32(&device, shared::train::Precision::F16);
}

#[test]
fn packed_bundles_stay_packed_on_wgpu_and_equal_the_cpu() {
    // The browser and `trainer predict --device wgpu` keep int8 and q4 weights packed (the matmul kernel
    // dequantizes them, the embedding unpacks only the looked-up rows); the CPU widens the same values to f32
    // once. Same numbers either way: the packing must be read exactly as it was written.
    let cpu = Device::flex();
    let model = perturb(config().init(&cpu).with_lora(&lora(8), &cpu).unwrap(), &cpu).merge_lora();
    let split = rows(3, 48);
    let out = temp_dir("packed");
    export_all_formats(&model, &out);
    let web = out.join("web");
    let gpu = Device::wgpu(Default::default());
    for file in ["model.int8.safetensors", "model.q4.safetensors"] {
        let ckpt = shared::model::weights::Checkpoint::from_files(vec![(
            file.into(),
            std::fs::read(web.join(file)).unwrap(),
        )])
        .unwrap();
        let format = if file.contains("q4") {
            shared::export::WeightFormat::Q4
        } else {
            shared::export::WeightFormat::Int8
        };
        let load = |placement: Placement| {
            // The page's estimate before downloading is what loading then takes.
            let estimate = shared::model::load::footprint(&config(), format, &placement);
            let loaded = shared::model::load::from_checkpoint(config(), &ckpt, placement).unwrap();
            assert_eq!(
                (estimate.device_bytes, estimate.host_bytes),
                (loaded.stats.device_bytes, loaded.stats.host_bytes),
                "{file}: footprint"
            );
            loaded.model
        };
        let on_cpu = load(Placement::from(&cpu));
        assert!(!on_cpu.model.layers[0].self_attn.q_proj.quantized);
        let want = logits(&on_cpu, &split, &cpu);
        // The table on the GPU, and (a 1 KiB binding limit) in host memory; the product inside burn's quantized
        // matmul (a hardware GPU, unless this build autotunes), or after dequantizing each weight (an emulated
        // one, as this lavapipe is).
        for (limit, software) in [(None, false), (Some(1024), false), (None, true)] {
            let packed = load(Placement::new(gpu.clone(), limit).with_software_adapter(software));
            let q = &packed.model.layers[0].self_attn.q_proj;
            assert!(q.quantized, "{file}: projections stay packed");
            assert_eq!(
                q.in_kernel,
                !software && !shared::model::placement::AUTOTUNE,
                "{file}: dequantized in the matmul kernel"
            );
            assert!(matches!(
                q.base.weight.val().dtype(),
                burn::tensor::DType::QFloat(_)
            ));
            let table = packed.model.packed_embed.as_ref().expect("a packed table");
            assert_eq!(
                table.device() == gpu,
                limit.is_none(),
                "{file}: table placement"
            );
            let d = max_diff(&want, &logits(&packed, &split, &gpu));
            assert!(
                d < 1e-4,
                "{file} (limit {limit:?}, software {software}): wgpu differs from the CPU by {d}"
            );
            // `--dtype f16` on a packed model: the packed weights stay packed (a cast would unpack them), the
            // rest goes to f16, and the quantized matmul yields f16 activations.
            let half = packed.cast(burn::tensor::FloatDType::F16);
            let q = &half.model.layers[0].self_attn.q_proj;
            assert!(matches!(
                q.base.weight.val().dtype(),
                burn::tensor::DType::QFloat(_)
            ));
            let d = max_diff(&want, &logits(&half, &split, &gpu));
            assert!(
                d < 5e-2,
                "{file} (limit {limit:?}, software {software}) in f16: differs from f32 by {d}"
            );
        }
    }
}

/// `base` with layer 0's feed-forward input scaled by 1000 (Gemma's norm weight `w` in `(1 + w)`) and its
/// up-projection by 1000: every weight still fits f16, but the up-projection's outputs pass f16's largest value
/// (65504) while f32 holds them. The shape of an f16 overflow in a real model's activations.
fn overflowing_in_f16(
    mut base: Gemma2ForSequenceClassification,
) -> Gemma2ForSequenceClassification {
    let layer = &mut base.model.layers[0];
    let norm = &mut layer.pre_feedforward_layernorm;
    norm.weight = Param::from_tensor(norm.weight.val().zeros_like().add_scalar(999.0).detach());
    let up = &mut layer.mlp.up_proj.base;
    up.weight = Param::from_tensor(up.weight.val().mul_scalar(1e3).detach());
    base
}

/// An f16 forward pass that overflows makes the loss NaN whatever the loss scale, so the step stops at once with
/// an error naming its rows and what to use, instead of halving the scale 17 times and blaming the gradients;
/// evaluating such a model names the row instead of counting NaN as a prediction of model_a. f32 runs it.
#[test]
fn an_overflowing_f16_forward_pass_stops_the_step_and_names_its_rows() {
    use shared::train::{Precision, TrainError, for_training, train_step, trainable_ids};
    let device = Device::flex().autodiff();
    let base = overflowing_in_f16(config().init(&device));
    let split = rows(2, 32);
    let micro = [vec![0, 1]];
    let step = |precision| {
        let settings = TrainConfig {
            lora: lora(4),
            precision,
            ..TrainConfig::default()
        };
        let model = for_training(base.clone(), &settings, &device).unwrap();
        let trainable = trainable_ids(&model);
        let mut scaler = settings.loss_scaler(&device);
        let mut optim = burn::optim::AdamWConfig::new().init();
        let result = train_step(
            model,
            &mut optim,
            &micro,
            &split,
            &settings,
            0,
            1e-3,
            &trainable,
            scaler.as_mut(),
            &device,
        );
        (result.map(|(_, out)| out), scaler, settings)
    };
    let (f32_step, _, _) = step(Precision::F32);
    let loss = f32_step.unwrap().loss.try_to_vec_as::<f32>().unwrap()[0];
    assert!(loss.is_finite(), "f32 loss {loss}");

    let (f16_step, scaler, settings) = step(Precision::F16);
    let Err(e) = f16_step else {
        panic!("an f16 step whose activations overflow succeeded");
    };
    assert!(
        matches!(e, TrainError::ForwardOverflow { step: 1, .. }),
        "{e}"
    );
    let message = e.to_string();
    for id in [&split.rows[0].id, &split.rows[1].id] {
        assert!(message.contains(id.as_str()), "{message}");
    }
    assert!(
        message.contains("bf16") && message.contains("f32"),
        "{message}"
    );
    // Stopped at the first try: the scale never moved.
    let scaler = scaler.unwrap();
    assert_eq!((scaler.scale, scaler.overflows), (65536.0, 0));

    let model = for_training(base, &settings, &device).unwrap().valid();
    let Err(e) = shared::train::evaluate_split(&model, &split, &settings, &Device::flex()) else {
        panic!("an f16 model whose activations overflow evaluated");
    };
    let TrainError::NonFinite { row, id, .. } = &e else {
        panic!("{e}");
    };
    assert_eq!((*row, id), (1, &split.rows[0].id), "{e}");
}

/// A run stopped in f16 resumes from its checkpoint in f32 (`trainer train --resume --precision f32`): the
/// steps after it run without a loss scale and the run completes.
#[test]
fn a_run_resumes_from_its_checkpoint_in_another_precision() {
    use shared::train::Precision;
    let device = Device::flex().autodiff();
    let base = config().init(&device);
    let split = rows(8, 32);
    let dir = temp_dir("resume-precision");
    let f16 = TrainConfig {
        lora: lora(4),
        precision: Precision::F16,
        batch_size: 2,
        grad_accum: 1,
        max_steps: Some(2),
        save_steps: 1,
        eval_steps: 2,
        logging_steps: 1,
        ..TrainConfig::default()
    };
    let data = || TrainData {
        train: &split,
        val: &split,
    };
    let first = train(
        base.clone(),
        &f16,
        data(),
        &RunDir::open(&dir, OpenMode::New).unwrap(),
        &device,
        &Quiet,
    )
    .unwrap();
    assert!(first.state.loss_scaler.is_some());
    // As if the run had stopped after its first checkpoint.
    std::fs::remove_dir_all(dir.join("checkpoint-2")).unwrap();
    let f32 = TrainConfig {
        precision: Precision::F32,
        ..f16
    };
    let resumed = train(
        base,
        &f32,
        data(),
        &RunDir::open(&dir, OpenMode::Resume).unwrap(),
        &device,
        &Quiet,
    )
    .unwrap();
    assert_eq!(resumed.steps_run, 1);
    assert!(resumed.state.loss_scaler.is_none());
    let (logs, _) = shared::train::read_log(&dir.join("log.jsonl")).unwrap();
    // The f16 step logs its loss scale (below 65536 if this small model's gradients overflowed at first); the f32
    // step has none.
    let scales: Vec<_> = logs.iter().map(|l| (l.step, l.loss_scale)).collect();
    assert!(
        matches!(scales[..], [(1, Some(s)), (2, None)] if s >= 1.0),
        "{logs:?}"
    );
    assert!(logs.iter().all(|l| l.loss.is_finite()));
}
