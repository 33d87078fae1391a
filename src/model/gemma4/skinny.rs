//! `x · Wᵀ` for a few rows of `x` on the CPU: the decode step's matrix products.
//!
//! A batched decode step multiplies one row per sequence by every weight matrix. The
//! `gemm` crate behind candle's CPU matmul runs one row as a matrix–vector product but
//! packs the weights into panels from two rows on, so the batch paid for its weights
//! again: measured here in CPU time on the small preset's 262,144 × 512 LM head, 1 row
//! 40 ms, 2 rows 90 ms, 4 rows 103 ms; on the 2048 × 512 MLP matrices 4 rows cost 6×
//! one. The kernel in `hark-kernels` streams each weight row once for all input rows
//! (4 rows: 88 ms on the LM head, 0.34 against 0.82 ms on the MLP matrices). No crate
//! does this: BLAS-style kernels optimise for many rows.
//!
//! Each output is one dot product summed in a fixed order, whatever the number of rows
//! and threads, so a sequence decoded in a batch gets bit-identical logits to the same
//! sequence decoded alone.

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};

/// Most rows taken by this kernel. Past 8 rows candle's matrix kernel, which packs
/// the weights and is compute-bound, is faster here (16 rows: 142 ms against 204 ms
/// of CPU time on the LM head).
pub const MAX_ROWS: usize = 8;

/// `x [m, k] · w[n, k]ᵀ → [m, n]` when this kernel applies (f32 on the CPU, `m` ≤
/// [`MAX_ROWS`], `w` contiguous); `None` otherwise, for the caller's usual path.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if !matches!(x.device(), Device::Cpu) || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return Ok(None);
    }
    let (Ok((m, k)), Ok((n, k2))) = (x.dims2(), w.dims2()) else { return Ok(None) };
    if m == 0 || m > MAX_ROWS || k != k2 || !w.is_contiguous() {
        return Ok(None);
    }
    let xs: Vec<f32> = x.contiguous()?.flatten_all()?.to_vec1()?;
    let by_row = {
        let (storage, layout) = w.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(data)) = &*storage else { return Ok(None) };
        let start = layout.start_offset();
        hark_kernels::matmul_t_by_row(&xs, m, &data[start..start + n * k], n, k)
    };
    let y = Tensor::from_vec(by_row, (n, m), &Device::Cpu)?;
    Ok(Some(if m == 1 { y.reshape((1, n))? } else { y.t()?.contiguous()? }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &Tensor, w: &Tensor) -> Vec<Vec<f32>> {
        let (x, w) = (x.to_dtype(DType::F64).unwrap(), w.to_dtype(DType::F64).unwrap());
        x.matmul(&w.t().unwrap()).unwrap().to_dtype(DType::F32).unwrap().to_vec2().unwrap()
    }

    #[test]
    fn matches_a_double_precision_product_for_every_row_count() {
        let dev = Device::Cpu;
        // k = 67 leaves a remainder after the 16-lane chunks; n = 200 ends mid-task.
        let w = Tensor::randn(0f32, 1.0, (200, 67), &dev).unwrap();
        for m in 1..=MAX_ROWS {
            let x = Tensor::randn(0f32, 1.0, (m, 67), &dev).unwrap();
            let y = matmul_t(&x, &w).unwrap().expect("kernel applies").to_vec2::<f32>().unwrap();
            let r = reference(&x, &w);
            for (yr, rr) in y.iter().zip(&r) {
                for (a, b) in yr.iter().zip(rr) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "m={m}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_and_in_a_batch() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (300, 128), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (7, 128), &dev).unwrap();
        let batch = matmul_t(&x, &w).unwrap().unwrap().to_vec2::<f32>().unwrap();
        for i in 0..7 {
            let alone = matmul_t(&x.narrow(0, i, 1).unwrap(), &w).unwrap().unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(alone[0], batch[i], "row {i}");
        }
    }

    #[test]
    fn declines_what_it_does_not_handle() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (8, 4), &dev).unwrap();
        let many = Tensor::randn(0f32, 1.0, (MAX_ROWS + 1, 4), &dev).unwrap();
        assert!(matmul_t(&many, &w).unwrap().is_none());
        let bf16 = Tensor::randn(0f32, 1.0, (2, 4), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        assert!(matmul_t(&bf16, &w.to_dtype(DType::BF16).unwrap()).unwrap().is_none());
        let transposed = Tensor::randn(0f32, 1.0, (4, 8), &dev).unwrap().t().unwrap();
        assert!(matmul_t(&Tensor::randn(0f32, 1.0, (2, 4), &dev).unwrap(), &transposed).unwrap().is_none());
    }
}
