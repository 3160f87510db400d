//! Where the classifier's weights live.
//!
//! A GPU kernel can bind only so large a buffer: WebGPU guarantees 128 MiB per storage binding, lavapipe allows
//! no more, browsers rarely more than 2 GiB. Gemma-2's token embedding is `256000 × hidden`, which is 500 MiB for
//! a hidden size of 512 in f32 and 1.2 GB for gemma-2-2b in f16; every other tensor is far smaller. The table is
//! only ever indexed (the classifier has no LM head that would multiply by it), so when it does not fit, it stays
//! in host memory on the CPU backend: each batch looks up its rows there and uploads just those
//! (`[batch, seq, hidden]`, a few MB), and the layers run on the GPU.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use burn::tensor::Device;

/// The compute device and how large a tensor it can hold in one binding.
#[derive(Clone, Debug)]
pub struct Placement {
    /// Runs the layers and the head.
    pub compute: Device,
    /// The largest buffer one kernel may bind on `compute`, in bytes; `None` where there is no such limit (the
    /// CPU backend).
    pub max_binding_bytes: Option<u64>,
    /// `compute` is a GPU emulated on the CPU (lavapipe, or Chromium's SwiftShader: wgpu reports a CPU adapter).
    /// There burn's quantized matmul, which dequantizes packed weights inside its kernel, ran 7 to 12 times slower
    /// than dequantizing the weight and then multiplying (measured on lavapipe: a 2304 × 9216 q4 projection times
    /// 20 or 512 tokens, 2.4 s against 0.33 s and 9.4 s against 2.0 s), so packed projections are dequantized
    /// before each product instead (see [`crate::model::lora::Projection::in_kernel`]).
    pub software_adapter: bool,
}

/// This build times candidate kernels for each matmul and reduction shape on first use and keeps the fastest
/// (burn's `autotune`, this crate's feature of the same name), instead of burn's fixed choice. Off by default: on
/// an emulated GPU each candidate costs seconds of shader compilation, and what it is worth on a real GPU is for
/// `bench/gpu.sh` to measure, which runs both builds.
pub const AUTOTUNE: bool = cfg!(feature = "autotune");

/// This build fuses its wgpu kernels (burn's `fusion`): chains of element-wise operations run as one kernel and
/// fold into the reduction or matmul they feed. Every native build and the browser's do; read from the backend
/// type itself, which fusion wraps, so a build that lost the feature says so.
pub fn fused_kernels() -> bool {
    std::any::type_name::<burn::backend::Wgpu>().contains("Fusion")
}

/// The storage-buffer binding size every WebGPU adapter supports (`maxStorageBufferBindingSize`'s default);
/// assumed for a GPU whose limits were not read.
pub const WEBGPU_DEFAULT_BINDING_BYTES: u64 = 128 << 20;

impl Placement {
    /// `compute` with a known binding limit (read from the adapter when the device was opened), taken for a
    /// hardware device.
    pub fn new(compute: Device, max_binding_bytes: Option<u64>) -> Self {
        Self {
            compute,
            max_binding_bytes,
            software_adapter: false,
        }
    }

    /// The same placement, on an emulated (`true`) or hardware GPU.
    pub fn with_software_adapter(mut self, software: bool) -> Self {
        self.software_adapter = software;
        self
    }

    /// Whether packed projections are multiplied by burn's quantized matmul (dequantized inside the kernel, so
    /// the wide weight never exists): on a hardware GPU. The CPU backend's quantized matmul does not compute
    /// the plain product, and an emulated GPU's is far slower than dequantizing first (see
    /// [`software_adapter`](Self::software_adapter)).
    ///
    /// Never in a build with burn's autotuning ([`AUTOTUNE`]): the autotuner's candidate kernels for the
    /// quantized matmul either stop with an error or read out of bounds (a SIGSEGV on lavapipe), so packed
    /// projections are dequantized first there, and only plain matmuls are tuned.
    pub fn packed_matmul_in_kernel(&self) -> bool {
        is_gpu(&self.compute) && !self.software_adapter && !AUTOTUNE
    }

    /// Whether a tensor of `bytes` fits one binding on the compute device.
    pub fn fits(&self, bytes: u64) -> bool {
        self.max_binding_bytes.is_none_or(|max| bytes <= max)
    }

    /// The device for the token embedding of `vocab × hidden` values of `bytes_per_value` bytes: the compute
    /// device when it fits there, else the host CPU.
    pub fn embedding_device(&self, vocab: usize, hidden: usize, bytes_per_value: usize) -> Device {
        let bytes = (vocab as u64) * (hidden as u64) * (bytes_per_value as u64);
        if self.fits(bytes) {
            self.compute.clone()
        } else {
            Device::flex()
        }
    }
}

/// The binding limit read when [`wgpu`] or [`wgpu_async`] opened the adapter; 0 until then. There is one wgpu
/// runtime per process (per page in the browser), so one number.
static OPENED_LIMIT: AtomicU64 = AtomicU64::new(0);
/// Whether the adapter opened then is a CPU one (see [`Placement::software_adapter`]).
static OPENED_SOFTWARE: AtomicBool = AtomicBool::new(false);
/// The graphics API and shader language of the adapter opened then (see [`opened_adapter`]).
static OPENED_API: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// The graphics API the wgpu adapter opened by [`wgpu`] or [`wgpu_async`] runs on, and the language this build
/// compiles its kernels to there: "Vulkan, SPIR-V", "Metal, MSL", else WGSL. `None` until one was opened. cubecl
/// would still fall back to WGSL on a Vulkan driver without what its SPIR-V needs (the Vulkan memory model with
/// device scope, buffer device addresses, SPIR-V 1.3; lavapipe and NVIDIA's driver have them); the device's
/// `identity().fingerprint` does not tell, as cubecl writes `spirv_…` there whatever it compiles.
pub fn opened_adapter() -> Option<&'static str> {
    OPENED_API.get().copied()
}

fn api_and_language(backend: burn::tensor::wgpu::wgpu::Backend) -> &'static str {
    use burn::tensor::wgpu::wgpu::Backend;
    match backend {
        Backend::Vulkan if cfg!(not(any(target_os = "macos", target_family = "wasm"))) => "Vulkan, SPIR-V",
        Backend::Vulkan => "Vulkan, WGSL",
        Backend::Metal => "Metal, MSL",
        Backend::Dx12 => "DX12, WGSL",
        Backend::Gl => "OpenGL, WGSL",
        Backend::BrowserWebGpu => "WebGPU, WGSL",
        Backend::Noop => "no-op",
    }
}

/// Everything on `device`. A GPU's limit is the one read when it was opened by [`wgpu`] or [`wgpu_async`], or
/// else WebGPU's default.
impl From<&Device> for Placement {
    fn from(device: &Device) -> Self {
        let max = is_gpu(device).then(|| match OPENED_LIMIT.load(Ordering::Relaxed) {
            0 => WEBGPU_DEFAULT_BINDING_BYTES,
            opened => opened,
        });
        Self::new(device.clone(), max)
            .with_software_adapter(is_gpu(device) && OPENED_SOFTWARE.load(Ordering::Relaxed))
    }
}

fn opened(device: Device, setup: &burn::tensor::wgpu::WgpuSetup) -> Placement {
    let limits = setup.device.limits();
    let max = limits
        .max_storage_buffer_binding_size
        .min(limits.max_buffer_size);
    // lavapipe natively; in the browser, wgpu maps WebGPU's `isFallbackAdapter` (SwiftShader) to a CPU adapter.
    let software =
        setup.adapter.get_info().device_type == burn::tensor::wgpu::wgpu::DeviceType::Cpu;
    OPENED_LIMIT.store(max, Ordering::Relaxed);
    OPENED_SOFTWARE.store(software, Ordering::Relaxed);
    let _ = OPENED_API.set(api_and_language(setup.backend));
    Placement::new(device, Some(max)).with_software_adapter(software)
}

impl From<Device> for Placement {
    fn from(device: Device) -> Self {
        Self::from(&device)
    }
}

/// Whether `device` is a wgpu device (Vulkan, Metal, DX12, WebGPU, lavapipe) rather than burn's CPU backend.
pub fn is_gpu(device: &Device) -> bool {
    format!("{device:?}").to_lowercase().contains("wgpu")
}

/// Opens the default wgpu adapter with its own limits (not WebGPU's defaults) and returns it with its largest
/// storage binding. Only the first call opens it; later calls, and callers after the runtime was opened some
/// other way, get the same device (with WebGPU's default limit assumed in the second case).
#[cfg(not(target_family = "wasm"))]
pub fn wgpu() -> Result<Placement, WgpuOpenError> {
    use std::sync::OnceLock;
    static OPENED: OnceLock<Result<Placement, WgpuOpenError>> = OnceLock::new();
    OPENED
        .get_or_init(|| {
            #[cfg(feature = "native")]
            tune_fusion();
            skip_unfused_broadcast_reduce();
            match Device::wgpu_options().init_with_setup() {
                Ok((device, setup)) => Ok(opened(device, &setup)),
                // Opened earlier by a tensor operation on the default device: that device is usable, its limits
                // just were not read.
                Err(burn::tensor::wgpu::WgpuInitError::Registration { .. }) => {
                    Ok(Placement::from(&Device::wgpu(Default::default())))
                }
                Err(e) => Err(WgpuOpenError(e.to_string())),
            }
        })
        .clone()
}

/// How many independent blocks burn's fusion explores at once in a segment of queued operations, set by
/// [`tune_fusion`]; burn's default is 5.
pub const FUSION_MAX_BLOCKS: usize = 2;

/// Sets burn's fusion search to explore at most [`FUSION_MAX_BLOCKS`] independent blocks at once, unless a
/// `burn.toml` (which burn reads from the working directory or a parent) says otherwise. Returns whether it did:
/// burn's configuration is set once per process, so not after a tensor operation read it.
///
/// Why: with burn's default of 5 blocks, the search composes blocks of a training step's backward pass (the RMS
/// norms' gradients around each layer) that depend on each other in a cycle; burn then runs the whole segment,
/// 19 to 48 operations, unfused, one kernel per operation ("[repair] falling back to unfused stream order" in its
/// log, `BURN_FUSION_LOG=medium`): 8 segments, 291 operations, in a one-step run of the tiny preset. With 2 blocks
/// it did not happen once, and a step launched 0.72x the kernels (692 against 965, `bench/kernels.sh`).
#[cfg(all(feature = "native", not(target_family = "wasm")))]
pub fn tune_fusion() -> bool {
    use cubecl_environment::config::RuntimeConfig;
    let mut dir = std::env::current_dir().ok();
    while let Some(d) = dir {
        if ["burn.toml", "Burn.toml"].iter().any(|n| d.join(n).is_file()) {
            return false;
        }
        dir = d.parent().map(std::path::Path::to_path_buf);
    }
    let text = format!("[fusion.beam_search]\nmax_blocks = {FUSION_MAX_BLOCKS}\n");
    let Ok(config) = toml::from_str::<burn::BurnConfig>(&text) else {
        return false;
    };
    burn::BurnConfig::try_set(config.override_from_env())
}

/// Takes burn's `ReduceBroadcasted` fusion out of the search, in a build without burn's autotuning (every build
/// but the opt-in [`AUTOTUNE`] one, the browser's included). Returns whether it did: like [`tune_fusion`], only
/// before the first operation on a fused device.
///
/// Why: that optimization claims a reduction together with the element-wise work before it and the broadcast
/// work after it (a softmax's `exp`, sum and division; a norm's or a broadcast's gradient), and scores above the
/// plain reduce fusion, which would run the reduction with its input's work in one kernel. But without autotuning
/// burn 0.22 never launches its fused kernel: it always runs its fallback, the input's work, the reduction and
/// the output's work as three kernels. Without it, the same operations go to the reduce fusion: one kernel for
/// the input's work and the reduction (with the work on its output), one for the broadcast work. A one-row LoRA
/// step at gemma-2-2b's graph launched 2,352 kernels instead of 2,392 (attention's log-sum-exp in each layer with
/// an adapter). With autotuning, burn times the fused kernel against that fallback, so the optimization stays.
pub fn skip_unfused_broadcast_reduce() -> bool {
    if AUTOTUNE {
        return false;
    }
    burn_cubecl::fusion::remove(BROADCAST_REDUCE).is_ok()
}

/// burn's name for the optimization [`skip_unfused_broadcast_reduce`] removes (a name it does not know is no error,
/// so a test holds it to burn's list).
const BROADCAST_REDUCE: &str = "ReduceBroadcasted";

/// The wgpu adapter could not be opened (the message is wgpu's).
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot open a wgpu adapter: {0}")]
pub struct WgpuOpenError(pub String);

/// [`wgpu`] for the browser: WebGPU with the adapter's own limits. The runtime opens once per page, so a second
/// call (another bundle) gets the same device.
pub async fn wgpu_async() -> Result<Placement, WgpuOpenError> {
    thread_local! {
        static OPENED: std::cell::RefCell<Option<Placement>> = const { std::cell::RefCell::new(None) };
    }
    if let Some(p) = OPENED.with(|o| o.borrow().clone()) {
        return Ok(p);
    }
    skip_unfused_broadcast_reduce();
    let (device, setup) = Device::wgpu_options()
        .init_with_setup_async()
        .await
        .map_err(|e| WgpuOpenError(e.to_string()))?;
    let placement = opened(device, &setup);
    OPENED.with(|o| *o.borrow_mut() = Some(placement.clone()));
    Ok(placement)
}

#[cfg(all(test, feature = "native"))]
mod tests {
    use super::*;

    /// Runs the ignored test `name` of this test binary alone, in a fresh process (burn's configuration is set
    /// once per process, and another test may have read it first), in `dir`; returns whether it passed.
    fn in_fresh_process(name: &str, dir: &std::path::Path, env: (&str, &str)) -> bool {
        let exe = std::env::current_exe().expect("the test binary");
        let out = std::process::Command::new(exe)
            .args([name, "--exact", "--ignored", "--test-threads=1"])
            .current_dir(dir)
            .env(env.0, env.1)
            .output()
            .expect("the test binary runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("1 passed") || text.contains("1 failed"), "{name} did not run: {text}");
        out.status.success()
    }

    fn scratch_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("arena-judge-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        dir
    }

    /// Native builds fuse (Cargo.toml turns on burn's `fusion` for every target); the browser's build is checked
    /// by web/browser-tests, where the page reports the same function.
    #[test]
    fn this_build_fuses_its_wgpu_kernels() {
        let backend = std::any::type_name::<burn::backend::Wgpu>();
        assert!(fused_kernels(), "the wgpu backend is not wrapped in fusion: {backend}");
    }

    #[test]
    #[ignore = "run alone in a fresh process by fusion_search_is_narrowed_unless_burn_toml_says_otherwise"]
    fn fresh_process_tune_fusion() {
        use cubecl_environment::config::RuntimeConfig;
        let tuned = tune_fusion();
        let blocks = burn::BurnConfig::get().fusion().beam_search.max_blocks;
        let wanted = std::env::var("EXPECT_TUNED").expect("set by the caller") == "1";
        assert_eq!(tuned, wanted);
        assert_eq!(blocks, if wanted { FUSION_MAX_BLOCKS } else { 7 });
    }

    #[test]
    fn fusion_search_is_narrowed_unless_burn_toml_says_otherwise() {
        const NAME: &str = "model::placement::tests::fresh_process_tune_fusion";
        // No burn.toml from a fresh directory up (the test runs in a temporary one): narrowed.
        let plain = scratch_dir("plain");
        assert!(
            in_fresh_process(NAME, &plain, ("EXPECT_TUNED", "1")),
            "not narrowed without a burn.toml"
        );
        // A user's burn.toml wins (here it asks for 7 blocks).
        let own = scratch_dir("own");
        std::fs::write(own.join("burn.toml"), "[fusion.beam_search]\nmax_blocks = 7\n").expect("burn.toml");
        assert!(
            in_fresh_process(NAME, &own, ("EXPECT_TUNED", "0")),
            "a user's burn.toml was overridden"
        );
        let _ = std::fs::remove_dir_all(plain);
        let _ = std::fs::remove_dir_all(own);
    }

    #[test]
    fn the_removed_fusion_is_one_burn_has() {
        assert!(burn_cubecl::fusion::BUILTIN_NAMES.contains(&BROADCAST_REDUCE));
    }

    #[test]
    #[ignore = "run alone in a fresh process by a_broadcast_reduce_runs_in_fewer_kernels_without_that_fusion"]
    fn fresh_process_broadcast_reduce() {
        use burn::tensor::{Distribution, Tensor};
        let skip = std::env::var("SKIP_BROADCAST_REDUCE").expect("set by the caller") == "1";
        if skip {
            assert!(skip_unfused_broadcast_reduce(), "not removed before the first operation");
        }
        let device = Device::wgpu(Default::default());
        // A log-softmax's shape of work, as attention's in a training pass: the sum's `exp` and its `ln` around
        // the reduction, then the broadcast subtraction.
        let s = Tensor::<4>::random([1, 2, 64, 64], Distribution::Default, &device);
        let log_total = s.clone().exp().sum_dim(3).log();
        let p = (s - log_total).exp().sum_dim(3).try_to_vec_as::<f32>().expect("f32");
        assert!(p.iter().all(|v| (v - 1.0).abs() < 1e-5), "rows do not sum to 1: {p:?}");
        assert!(!skip_unfused_broadcast_reduce(), "removed after the fusion service started");
    }

    #[test]
    fn a_broadcast_reduce_runs_in_fewer_kernels_without_that_fusion() {
        const NAME: &str = "model::placement::tests::fresh_process_broadcast_reduce";
        let launches = |skip: &str| {
            let dir = scratch_dir(&format!("broadcast-reduce-{skip}"));
            let log = dir.join("launches.log");
            let toml = format!("[profiling.logger]\nlevel = \"minimal\"\nfile = {log:?}\nappend = false\n");
            std::fs::write(dir.join("cubecl.toml"), toml).expect("cubecl.toml");
            assert!(in_fresh_process(NAME, &dir, ("SKIP_BROADCAST_REDUCE", skip)), "skip={skip} failed");
            let text = std::fs::read_to_string(&log).expect("cubecl's launch log");
            let _ = std::fs::remove_dir_all(dir);
            text.lines().filter(|l| l.starts_with("Executing")).count()
        };
        let (with, without) = (launches("0"), launches("1"));
        assert!(without < with, "{without} launches without the fusion, {with} with it");
    }

    #[test]
    fn the_cpu_has_no_binding_limit() {
        let p = Placement::from(&Device::flex());
        assert!(p.fits(u64::MAX));
        assert!(!is_gpu(&p.compute));
    }

    #[test]
    fn an_embedding_over_the_limit_goes_to_the_host() {
        let gpu = Placement::new(Device::flex(), Some(1000));
        // 10 × 25 f32 = 1000 bytes: fits exactly; one more row does not.
        assert!(gpu.fits(10 * 25 * 4));
        assert!(!gpu.fits(11 * 25 * 4));
        let unknown = Placement::new(Device::flex(), Some(WEBGPU_DEFAULT_BINDING_BYTES));
        // gemma-2-2b's table in f16 (1.2 GB) is over WebGPU's default binding.
        assert!(!unknown.fits(256_000 * 2304 * 2));
    }
}
