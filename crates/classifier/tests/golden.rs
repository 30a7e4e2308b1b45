//! Checks the classifier losses (values and gradients) against numpy goldens
//! (`tests/golden/make_golden.py`, which states the reference formulas).

use candle_core::{Device, Tensor, Var};
use serde_json::Value;
use simtrans_classifier::losses::{
    adjacency, cos_loss, cross_entropy_per_sample, gcn_loss, label_mask, relax, weighted_ce,
    GraphReg, Reg,
};

fn golden() -> Value {
    serde_json::from_str(include_str!("golden/losses_golden.json")).unwrap()
}

fn vec1(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn mat(v: &Value) -> Tensor {
    let rows: Vec<Vec<f32>> = v.as_array().unwrap().iter().map(vec1).collect();
    Tensor::new(rows, &Device::Cpu).unwrap()
}

fn labels(v: &Value) -> Tensor {
    let l: Vec<u32> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    Tensor::new(l, &Device::Cpu).unwrap()
}

fn scalar(t: &Tensor) -> f32 {
    t.to_scalar::<f32>().unwrap()
}

/// Largest absolute difference, relative to the largest golden magnitude (at least 1).
fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
    let scale = simtrans_core::compare::max_abs(want).unwrap().max(1.0);
    simtrans_core::compare::max_abs_diff(got, want).unwrap() / scale
}

#[test]
fn weighted_cross_entropy_and_its_gradient() {
    let g = &golden()["ce"];
    let z = Var::from_tensor(&mat(&g["logits"])).unwrap();
    let y = labels(&g["labels"]);
    let w = Tensor::new(vec1(&g["weights"]), &Device::Cpu).unwrap();
    let per = cross_entropy_per_sample(z.as_tensor(), &y).unwrap();
    let want_per = Tensor::new(vec1(&g["per_sample"]), &Device::Cpu).unwrap();
    assert!(rel_err(&per, &want_per) < 1e-5);
    let loss = weighted_ce(z.as_tensor(), &y, &w).unwrap();
    assert!((scalar(&loss) - g["loss"].as_f64().unwrap() as f32).abs() < 1e-5);
    let grads = loss.backward().unwrap();
    assert!(rel_err(grads.get(&z).unwrap(), &mat(&g["grad_logits"])) < 1e-5);
}

#[test]
fn relax_matches() {
    let g = &golden()["relax"];
    let a = Tensor::new(vec1(&g["a"]), &Device::Cpu).unwrap();
    for (mu, want) in g["mu"]
        .as_array()
        .unwrap()
        .iter()
        .zip(g["values"].as_array().unwrap())
    {
        let got = relax(&a, mu.as_f64().unwrap()).unwrap();
        let want = Tensor::new(vec1(want), &Device::Cpu).unwrap();
        assert!(rel_err(&got, &want) < 1e-5, "mu {mu}");
    }
}

#[test]
fn mask_adjacency_and_graph_losses_with_gradients() {
    let gold = golden();
    let g = &gold["graph"];
    let feats = Var::from_tensor(&mat(&g["g"])).unwrap();
    let a = mat(&g["a"]);
    let y = labels(&g["labels"]);
    let mu = g["mu"].as_f64().unwrap();
    for case in g["cases"].as_array().unwrap() {
        let eye = case["eye"].as_f64().unwrap();
        let mask = label_mask(&y, eye, candle_core::DType::F32).unwrap();
        assert!(rel_err(&mask, &mat(&case["mask"])) < 1e-7, "eye {eye}");
        let a_hat = adjacency(&a, &y, mu, eye).unwrap();
        assert!(rel_err(&a_hat, &mat(&case["a_hat"])) < 1e-5, "eye {eye}");

        let loss = gcn_loss(feats.as_tensor(), &a_hat).unwrap();
        let want = case["gcn"].as_f64().unwrap() as f32;
        assert!(
            (scalar(&loss) - want).abs() < 1e-5 * want.abs().max(1.0),
            "gcn, eye {eye}"
        );
        let grads = loss.backward().unwrap();
        assert!(
            rel_err(grads.get(&feats).unwrap(), &mat(&case["gcn_grad"])) < 1e-5,
            "gcn grad, eye {eye}"
        );

        let loss = cos_loss(feats.as_tensor(), &a_hat).unwrap();
        let want = case["cos"].as_f64().unwrap() as f32;
        assert!(
            (scalar(&loss) - want).abs() < 1e-5 * want.abs().max(1.0),
            "cos, eye {eye}"
        );
        let grads = loss.backward().unwrap();
        assert!(
            rel_err(grads.get(&feats).unwrap(), &mat(&case["cos_grad"])) < 1e-4,
            "cos grad, eye {eye}"
        );

        // The combined graph term is α times the regulariser on the same Â.
        let gr = GraphReg {
            reg: Reg::Gcn,
            alpha: 0.1,
            mu,
            eye,
        };
        let term = gr.loss(feats.as_tensor(), &a, &y).unwrap();
        let want = 0.1 * case["gcn"].as_f64().unwrap() as f32;
        assert!((scalar(&term) - want).abs() < 1e-5 * want.abs().max(1.0));
    }
}
