//! Tensor comparisons for tests, goldens and GPU-against-CPU checks: the largest magnitude, the
//! largest difference and the cosine of two tensors, computed in f32 on the CPU whatever the
//! tensors' device and dtype. The tests of several crates compare tensors this way; one
//! definition keeps them meaning the same thing by "max |a − b|". Tolerances and the scale a
//! difference is measured against stay with each test.

use candle_core::{bail, DType, Device, Result, Tensor};

/// `t` as an f32 tensor on the CPU.
pub fn cpu_f32(t: &Tensor) -> Result<Tensor> {
    t.to_device(&Device::Cpu)?.to_dtype(DType::F32)
}

/// `max |t|`.
pub fn max_abs(t: &Tensor) -> Result<f32> {
    cpu_f32(t)?.abs()?.max_all()?.to_scalar::<f32>()
}

/// `max |a − b|`; an error unless the two have the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    if a.dims() != b.dims() {
        bail!("cannot compare shapes {:?} and {:?}", a.dims(), b.dims())
    }
    max_abs(&(cpu_f32(a)? - cpu_f32(b)?)?)
}

/// The cosine of the angle between two tensors of the same size, flattened.
pub fn cosine(a: &Tensor, b: &Tensor) -> Result<f32> {
    let (a, b) = (cpu_f32(a)?.flatten_all()?, cpu_f32(b)?.flatten_all()?);
    let dot = (&a * &b)?.sum_all()?.to_scalar::<f32>()?;
    let norm = |t: &Tensor| -> Result<f32> { t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>() };
    Ok(dot / (norm(&a)? * norm(&b)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magnitudes_differences_and_angles() {
        let a = Tensor::new(&[[1f32, -4.0], [2.0, 0.5]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[1f32, -1.0], [2.0, 0.5]], &Device::Cpu).unwrap();
        assert_eq!(max_abs(&a).unwrap(), 4.0);
        assert_eq!(max_abs_diff(&a, &b).unwrap(), 3.0);
        assert!(max_abs_diff(&a, &b.flatten_all().unwrap()).is_err());
        assert!((cosine(&a, &a).unwrap() - 1.0).abs() < 1e-6);
        let neg = a.neg().unwrap();
        assert!((cosine(&a, &neg).unwrap() + 1.0).abs() < 1e-6);
        // bf16 input is compared in f32.
        let low = a.to_dtype(DType::BF16).unwrap();
        assert_eq!(max_abs_diff(&low, &a).unwrap(), 0.0);
    }
}
