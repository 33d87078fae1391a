//! Fused elementwise steps for the GPU decode path, where a step is thousands of
//! kernel launches and the host's time to issue them, not the GPU, sets the pace
//! (`hark bench model --profile` on an H200: 94 % of a 12B decode step is issue time).
//!
//! - [`residual_rms`]: `(residual + rmsnorm(h)·w) · scale` — the post-attention and
//!   post-feed-forward norms with their residual adds (and the layer scalar): three
//!   launches become one.
//! - [`gelu_mul`]: `gelu_tanh(gate) · up` — two launches become one.
//!
//! Each rounds to the storage dtype exactly where the unfused candle ops do (after the
//! norm, after the add, after the product), so a bf16 model computes the same values.
//! The CUDA kernels are compiled with NVRTC when first used (no build-time nvcc step
//! for hark's own code); the CPU implementations are the reference the tests compare
//! with the composed candle ops.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// `(residual + rmsnorm(h) · w) · scale` over the last dimension; `scale` 1 skips the product.
pub fn residual_rms(residual: &Tensor, h: &Tensor, w: &Tensor, scale: Option<f32>, eps: f32) -> Result<Tensor> {
    if residual.shape() != h.shape() || h.dim(candle_core::D::Minus1)? != w.elem_count() {
        candle_core::bail!("residual_rms: shapes {:?}, {:?}, {:?} do not fit", residual.shape(), h.shape(), w.shape());
    }
    residual.contiguous()?.apply_op3_no_bwd(&h.contiguous()?, &w.contiguous()?, &ResidualRms { eps, scale })
}

/// `gelu_tanh(gate) · up`, elementwise.
pub fn gelu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        candle_core::bail!("gelu_mul: shapes {:?} and {:?} differ", gate.shape(), up.shape());
    }
    gate.contiguous()?.apply_op2_no_bwd(&up.contiguous()?, &GeluMul)
}

struct ResidualRms {
    eps: f32,
    scale: Option<f32>,
}

struct GeluMul;

/// What the storage dtype does to an f32 result (the rounding the kernels mimic).
trait Elem: Copy {
    fn load(self) -> f32;
    fn store(v: f32) -> Self;
    fn round(v: f32) -> f32 {
        Self::store(v).load()
    }
}
impl Elem for f32 {
    fn load(self) -> f32 {
        self
    }
    fn store(v: f32) -> Self {
        v
    }
}
impl Elem for half::bf16 {
    fn load(self) -> f32 {
        self.to_f32()
    }
    fn store(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

fn gelu_tanh(x: f32) -> f32 {
    // The tanh approximation Gemma uses (gelu_pytorch_tanh), as candle's `gelu`.
    0.5 * x * (1.0 + ((2.0f32 / std::f32::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

fn contiguous<'a, T>(s: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("fused op: input must be contiguous"),
    }
}

fn residual_rms_cpu<T: Elem>(res: &[T], h: &[T], w: &[T], cols: usize, eps: f32, scale: Option<f32>) -> Vec<T> {
    let mut out = Vec::with_capacity(res.len());
    for (r, x) in res.chunks(cols).zip(h.chunks(cols)) {
        let ss: f32 = x.iter().map(|v| v.load() * v.load()).sum();
        let inv = 1.0 / (ss / cols as f32 + eps).sqrt();
        for c in 0..cols {
            let t = T::round(inv * x[c].load() * w[c].load());
            let s = T::round(r[c].load() + t);
            out.push(T::store(match scale {
                Some(k) => s * k,
                None => s,
            }));
        }
    }
    out
}

impl CustomOp3 for ResidualRms {
    fn name(&self) -> &'static str {
        "hark-residual-rms"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = l3.shape().elem_count();
        let (eps, scale) = (self.eps, self.scale);
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c)) => {
                CpuStorage::F32(residual_rms_cpu(contiguous(a, l1)?, contiguous(b, l2)?, contiguous(c, l3)?, cols, eps, scale))
            }
            (CpuStorage::BF16(a), CpuStorage::BF16(b), CpuStorage::BF16(c)) => {
                CpuStorage::BF16(residual_rms_cpu(contiguous(a, l1)?, contiguous(b, l2)?, contiguous(c, l3)?, cols, eps, scale))
            }
            _ => candle_core::bail!("residual_rms: f32 or bf16 inputs of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::residual_rms(self, s1, l1, s2, l2, s3, l3)
    }
}

impl CustomOp2 for GeluMul {
    fn name(&self) -> &'static str {
        "hark-gelu-mul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(g: &[T], u: &[T]) -> Vec<T> {
            g.iter().zip(u).map(|(g, u)| T::store(T::round(gelu_tanh(g.load())) * u.load())).collect()
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => CpuStorage::F32(run(contiguous(a, l1)?, contiguous(b, l2)?)),
            (CpuStorage::BF16(a), CpuStorage::BF16(b)) => CpuStorage::BF16(run(contiguous(a, l1)?, contiguous(b, l2)?)),
            _ => candle_core::bail!("gelu_mul: f32 or bf16 inputs of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::gelu_mul(s1, l1, s2, l2)
    }
}

/// Whether the fused ops can run on tensors of `dtype` (the kernels exist for f32 and bf16).
pub fn supported(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16)
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::OnceLock;

    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaStorage, Layout, Result, Shape};

    /// bf16 is handled as raw 16-bit words (no cuda_bf16.h, so NVRTC needs no include
    /// path on the GPU machine); rounding to nearest even, as candle's conversions do.
    const SRC: &str = r#"
typedef unsigned short bf16;
template <typename T> struct IO;
template <> struct IO<float> {
    static __device__ __forceinline__ float ld(const float* p, long i) { return p[i]; }
    static __device__ __forceinline__ void st(float* p, long i, float v) { p[i] = v; }
    static __device__ __forceinline__ float rnd(float v) { return v; }
};
template <> struct IO<bf16> {
    static __device__ __forceinline__ bf16 to(float v) {
        unsigned u = __float_as_uint(v);
        if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
        u += 0x7fffu + ((u >> 16) & 1u);
        return (bf16)(u >> 16);
    }
    static __device__ __forceinline__ float ld(const bf16* p, long i) { return __uint_as_float(((unsigned)p[i]) << 16); }
    static __device__ __forceinline__ void st(bf16* p, long i, float v) { p[i] = to(v); }
    static __device__ __forceinline__ float rnd(float v) { return __uint_as_float(((unsigned)to(v)) << 16); }
};

template <typename T>
__device__ void residual_rms(const T* res, const T* h, const T* w, T* out, int cols, float eps, float scale, int has_scale) {
    long base = (long)blockIdx.x * cols;
    float ss = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) { float x = IO<T>::ld(h, base + c); ss += x * x; }
    __shared__ float part[32];
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) part[warp] = ss;
    __syncthreads();
    ss = lane < (int)(blockDim.x / 32) ? part[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    float inv = rsqrtf(ss / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float t = IO<T>::rnd(inv * IO<T>::ld(h, base + c) * IO<T>::ld(w, c));
        float s = IO<T>::rnd(IO<T>::ld(res, base + c) + t);
        IO<T>::st(out, base + c, has_scale ? s * scale : s);
    }
}

template <typename T>
__device__ void gelu_mul(const T* g, const T* u, T* out, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float x = IO<T>::ld(g, i);
        float a = IO<T>::rnd(0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x))));
        IO<T>::st(out, i, a * IO<T>::ld(u, i));
    }
}

extern "C" __global__ void residual_rms_f32(const float* r, const float* h, const float* w, float* o, int c, float e, float s, int hs) { residual_rms<float>(r, h, w, o, c, e, s, hs); }
extern "C" __global__ void residual_rms_bf16(const bf16* r, const bf16* h, const bf16* w, bf16* o, int c, float e, float s, int hs) { residual_rms<bf16>(r, h, w, o, c, e, s, hs); }
extern "C" __global__ void gelu_mul_f32(const float* g, const float* u, float* o, long n) { gelu_mul<float>(g, u, o, n); }
extern "C" __global__ void gelu_mul_bf16(const bf16* g, const bf16* u, bf16* o, long n) { gelu_mul<bf16>(g, u, o, n); }
"#;

    const MODULE: &str = "hark_fused";

    fn ptx() -> Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        PTX.get_or_init(|| {
            candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(SRC).map(|p| p.to_src()).map_err(|e| format!("compiling hark's fused kernels: {e}"))
        })
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(e.clone()))
    }

    fn range(l: &Layout) -> Result<(usize, usize)> {
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("fused op: input must be contiguous".into()))
    }

    pub fn residual_rms(
        op: &super::ResidualRms,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s1.device.clone();
        let cols = l3.shape().elem_count();
        let rows = l1.shape().elem_count() / cols.max(1);
        let (r1, r2, r3) = (range(l1)?, range(l2)?, range(l3)?);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (if cols >= 1024 { 1024 } else { 256 }, 1, 1), shared_mem_bytes: 0 };
        let (scale, has_scale) = (op.scale.unwrap_or(1.0), op.scale.is_some() as i32);
        let cols_i = cols as i32;
        macro_rules! launch {
            ($a:expr, $b:expr, $c:expr, $ty:ty, $name:expr, $wrap:path) => {{
                let (a, b, c) = ($a.slice(r1.0..r1.1), $b.slice(r2.0..r2.1), $c.slice(r3.0..r3.1));
                // SAFETY: every element is written by the kernel below.
                let out = unsafe { dev.alloc::<$ty>(r1.1 - r1.0)? };
                let func = dev.get_or_load_custom_func($name, MODULE, ptx()?)?;
                let mut b_ = func.builder();
                b_.arg(&a).arg(&b).arg(&c).arg(&out).arg(&cols_i).arg(&op.eps).arg(&scale).arg(&has_scale);
                // SAFETY: arguments match the kernel's signature.
                unsafe { b_.launch(cfg) }.w()?;
                $wrap(out)
            }};
        }
        let slice = match (&s1.slice, &s2.slice, &s3.slice) {
            (CudaStorageSlice::F32(a), CudaStorageSlice::F32(b), CudaStorageSlice::F32(c)) => {
                launch!(a, b, c, f32, "residual_rms_f32", CudaStorageSlice::F32)
            }
            (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b), CudaStorageSlice::BF16(c)) => {
                launch!(a, b, c, half::bf16, "residual_rms_bf16", CudaStorageSlice::BF16)
            }
            _ => candle_core::bail!("residual_rms: f32 or bf16 inputs of one dtype"),
        };
        Ok((CudaStorage { slice, device: dev }, l1.shape().clone()))
    }

    pub fn gelu_mul(s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = s1.device.clone();
        let (r1, r2) = (range(l1)?, range(l2)?);
        let n = (r1.1 - r1.0) as i64;
        let blocks = ((n as u64).div_ceil(256)).clamp(1, 132 * 16) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        macro_rules! launch {
            ($a:expr, $b:expr, $ty:ty, $name:expr, $wrap:path) => {{
                let (a, b) = ($a.slice(r1.0..r1.1), $b.slice(r2.0..r2.1));
                // SAFETY: every element is written by the kernel below.
                let out = unsafe { dev.alloc::<$ty>(n as usize)? };
                let func = dev.get_or_load_custom_func($name, MODULE, ptx()?)?;
                let mut b_ = func.builder();
                b_.arg(&a).arg(&b).arg(&out).arg(&n);
                // SAFETY: arguments match the kernel's signature.
                unsafe { b_.launch(cfg) }.w()?;
                $wrap(out)
            }};
        }
        let slice = match (&s1.slice, &s2.slice) {
            (CudaStorageSlice::F32(a), CudaStorageSlice::F32(b)) => launch!(a, b, f32, "gelu_mul_f32", CudaStorageSlice::F32),
            (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b)) => launch!(a, b, half::bf16, "gelu_mul_bf16", CudaStorageSlice::BF16),
            _ => candle_core::bail!("gelu_mul: f32 or bf16 inputs of one dtype"),
        };
        Ok((CudaStorage { slice, device: dev }, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.to_dtype(DType::F32).unwrap();
        let b = b.to_dtype(DType::F32).unwrap();
        let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        d / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// The fused ops against the composed candle ops they replace, in f32 (to rounding
    /// of the sum order) and bf16 (to one bf16 step), with and without the scale.
    #[test]
    fn fused_ops_match_the_composed_ops() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16] {
            let r = Tensor::randn(0f32, 1.0, (3, 96), &dev).unwrap().to_dtype(dtype).unwrap();
            let h = Tensor::randn(0f32, 3.0, (3, 96), &dev).unwrap().to_dtype(dtype).unwrap();
            let w = (Tensor::randn(0f32, 0.1, 96, &dev).unwrap() + 1.0).unwrap().to_dtype(dtype).unwrap();
            let normed = candle_nn::ops::rms_norm(&h, &w, 1e-6).unwrap();
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
            let plain = (&r + &normed).unwrap();
            assert!(rel(&residual_rms(&r, &h, &w, None, 1e-6).unwrap(), &plain) < tol, "{dtype:?}");
            let scale = Tensor::new(&[0.75f32], &dev).unwrap().to_dtype(dtype).unwrap();
            let scaled = plain.broadcast_mul(&scale).unwrap();
            assert!(rel(&residual_rms(&r, &h, &w, Some(0.75), 1e-6).unwrap(), &scaled) < tol, "{dtype:?}");

            let g = Tensor::randn(0f32, 2.0, (5, 64), &dev).unwrap().to_dtype(dtype).unwrap();
            let u = Tensor::randn(0f32, 1.0, (5, 64), &dev).unwrap().to_dtype(dtype).unwrap();
            let composed = (g.gelu().unwrap() * &u).unwrap();
            assert!(rel(&gelu_mul(&g, &u).unwrap(), &composed) < tol, "{dtype:?}");
        }
        assert!(residual_rms(&Tensor::zeros((2, 4), DType::F32, &dev).unwrap(), &Tensor::zeros((2, 5), DType::F32, &dev).unwrap(), &Tensor::ones(4, DType::F32, &dev).unwrap(), None, 1e-6).is_err());
    }
}
