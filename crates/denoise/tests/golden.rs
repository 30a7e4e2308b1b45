//! Checks the weight schemes and the weight AUC against numpy goldens
//! (`tests/golden/make_golden.py`, which states the reference formulas).

use candle_core::{Device, Tensor};
use serde_json::Value;
use simtrans_denoise::auc::weight_auc;
use simtrans_denoise::weights::{weights, WeightScheme};

fn golden() -> Value {
    serde_json::from_str(include_str!("golden/denoise_golden.json")).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn weights_match_numpy() {
    let g = golden();
    for case in g["weights"].as_array().unwrap() {
        let rows: Vec<Vec<f32>> = case["s"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| floats(r).into_iter().map(|x| x as f32).collect())
            .collect();
        let l = rows.len();
        let s = Tensor::new(rows, &Device::Cpu).unwrap();
        for (name, want) in case["weights"].as_object().unwrap() {
            let scheme = WeightScheme::parse(name, 0.5).unwrap();
            let got = weights(&s, scheme).unwrap().to_vec1::<f32>().unwrap();
            let want = floats(want);
            assert_eq!(got.len(), l);
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (*a as f64 - b).abs() < 1e-5,
                    "L = {l}, {name}: {got:?} vs {want:?}"
                );
            }
        }
    }
}

#[test]
fn auc_matches_brute_force_numpy() {
    let g = &golden()["auc"];
    let w: Vec<f32> = floats(&g["weights"])
        .into_iter()
        .map(|x| x as f32)
        .collect();
    let kinds: Vec<u8> = g["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_u64().unwrap() as u8)
        .collect();
    let report = weight_auc(&w, &kinds, 0).unwrap();
    let close = |a: Option<f64>, b: &Value| (a.unwrap() - b.as_f64().unwrap()).abs() < 1e-12;
    assert!(close(report.overall, &g["overall"]), "{report:?}");
    assert_eq!(report.per_kind.len(), 3);
    for k in &report.per_kind {
        assert!(
            close(k.auc, &g["per_kind"][k.kind.to_string()]),
            "{report:?}"
        );
    }
}
