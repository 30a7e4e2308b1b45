//! Helpers shared by the integration tests: golden JSON tensors and small networks.

#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use serde_json::Value;

/// Reads a golden JSON file of this crate.
pub fn golden(name: &str) -> Value {
    let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// `{"shape": [...], "data": [...]}` → f32 tensor.
pub fn tensor(v: &Value) -> Tensor {
    let shape: Vec<usize> = v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let data = floats(&v["data"]);
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// A JSON array of numbers → f32.
pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// A JSON array of integers → u32.
pub fn labels(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A VarMap holding the given named tensors as variables.
pub fn varmap(params: &Value) -> VarMap {
    let vm = VarMap::new();
    {
        let mut data = vm.data().lock().unwrap();
        for (name, t) in params.as_object().unwrap() {
            data.insert(name.clone(), Var::from_tensor(&tensor(t)).unwrap());
        }
    }
    vm
}

/// A VarBuilder over an existing VarMap (missing variables would be seeded, but tests load all).
pub fn builder(vm: &VarMap) -> candle_nn::VarBuilder<'static> {
    simtrans_core::seed::var_builder(vm, 0, "test", DType::F32, &Device::Cpu)
}

/// Largest absolute difference, after checking shapes.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    simtrans_core::compare::max_abs_diff(a, b).unwrap()
}

/// Asserts `|a − b| ≤ tol·(1 + |b|)` element-wise.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{k}]: got {g}, want {w}"
        );
    }
}

/// `max |t|` (on the CPU, in f32).
pub fn max_abs(t: &Tensor) -> f32 {
    simtrans_core::compare::max_abs(t).unwrap()
}

/// The cosine between two tensors of the same size, flattened (on the CPU, in f32).
pub fn cosine(a: &Tensor, b: &Tensor) -> f32 {
    simtrans_core::compare::cosine(a, b).unwrap()
}
