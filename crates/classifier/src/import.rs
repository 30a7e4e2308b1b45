//! A classifier trained by the reference code as a `classifier-<variant>` artifact, evaluated
//! as the reference's `eval_model.py` evaluates it.
//!
//! The reference's step-3 classifier is `DataParallel(Net)` with the torchvision ResNet under
//! `Net.backbone` (names `module.backbone.*`); its `…params…` files are `Net.state_dict()`
//! (`backbone.*`). After the ResNet is loaded and checked against the config, the model is
//! measured on the novel test images with the test transform, exactly as a trained variant's
//! final epoch is, so the eval stage and the report treat it like any other variant.

use crate::stage::{output, predict, Sets};
use crate::variants::Variant;
use candle_core::{Device, Tensor};
use simtrans_core::{Config, StageOutput};
use simtrans_data::{DataIndex, Loader};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The classifier artifact of `variant` from a reference checkpoint's tensors, with the
/// novel-test results of its weights on `data`.
pub fn import(
    tensors: &BTreeMap<String, Tensor>,
    config: &Config,
    data: Arc<DataIndex>,
    variant: Variant,
    device: &Device,
) -> anyhow::Result<StageOutput> {
    use simtrans_backbone::import::{resnet_from_tensors, resnet_prefix, under};
    let prefix = resnet_prefix(tensors, &["module.backbone.", "backbone.", "module.", ""]);
    let resnet = under(tensors, prefix);
    let classes = data.novel_classes.len();
    let what = format!("the data set's {classes} novel classes");
    let (net, varmap) = resnet_from_tensors(&resnet, &config.backbone, classes, &what, device)?;
    let loader = Loader::new(data.clone(), &config.data)?;
    let sets = Sets::new(&data, variant)?;
    let preds = predict(
        &net,
        &loader,
        &sets.test_ids,
        config.eval.batch_size,
        device,
    )?;
    let mut out = output(
        variant,
        &data,
        &sets,
        &varmap,
        &preds,
        serde_json::json!({}),
    )?;
    // It was not trained here: no training images, no history.
    out.metrics["train_images"] = serde_json::Value::Null;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::VarMap;
    use simtrans_backbone::ResNet;
    use simtrans_core::config::DemoConfig;
    use simtrans_core::Preset;

    fn small_run() -> (Config, Arc<DataIndex>) {
        let mut config = Config::preset(Preset::Demo);
        config.data.demo = DemoConfig {
            base_train_per_class: 4,
            base_val_per_class: 1,
            web_per_class: 10,
            novel_test_per_class: 6,
            ..DemoConfig::default_recipe()
        };
        let (index, _) = simtrans_data::build_index(&config, 0).unwrap();
        (config, Arc::new(index))
    }

    /// `DataParallel(Net)`'s names for a ResNet of the config's shape with `classes` outputs.
    fn reference_state(config: &Config, classes: usize) -> BTreeMap<String, Tensor> {
        let vm = VarMap::new();
        let vb = simtrans_core::seed::var_builder(&vm, 11, "ref", DType::F32, &Device::Cpu);
        let b = &config.backbone;
        ResNet::new(b.arch, b.small_width, Some(classes), vb).unwrap();
        let data = vm.data().lock().unwrap();
        data.iter()
            .map(|(k, v)| (format!("module.backbone.{k}"), v.as_tensor().clone()))
            .collect()
    }

    #[test]
    fn an_imported_classifier_is_measured_on_the_novel_test_images() {
        let (config, data) = small_run();
        let state = reference_state(&config, 4);
        let out = import(&state, &config, data.clone(), Variant::Full, &Device::Cpu).unwrap();
        let test: Vec<u32> = data
            .items_in(simtrans_data::Split::NovelTest)
            .iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(out.metrics["test_ids"], serde_json::json!(test));
        // The same weights, built by hand, predict what the artifact recorded.
        let plain: BTreeMap<String, Tensor> = state
            .iter()
            .map(|(k, v)| {
                (
                    k.trim_start_matches("module.backbone.").to_string(),
                    v.clone(),
                )
            })
            .collect();
        let (net, _) = simtrans_backbone::import::resnet_from_tensors(
            &plain,
            &config.backbone,
            4,
            "test",
            &Device::Cpu,
        )
        .unwrap();
        let loader = Loader::new(data.clone(), &config.data).unwrap();
        let preds = predict(&net, &loader, &test, 7, &Device::Cpu).unwrap();
        let correct: Vec<u8> = data
            .items_in(simtrans_data::Split::NovelTest)
            .iter()
            .zip(&preds)
            .map(|(it, &p)| u8::from(data.local_label(it) == p))
            .collect();
        assert_eq!(out.metrics["correct_final"], serde_json::json!(correct));
        let top1 = correct.iter().map(|&c| c as f64).sum::<f64>() / correct.len() as f64;
        assert!((out.metrics["top1_final"].as_f64().unwrap() - top1).abs() < 1e-12);
        assert_eq!(
            out.tensors["fc.weight"].dims(),
            &[4, state["module.backbone.fc.weight"].dim(1).unwrap()]
        );
        // A params file (`backbone.*`, no DataParallel) is the same model.
        let params: BTreeMap<String, Tensor> = state
            .iter()
            .map(|(k, v)| (k.trim_start_matches("module.").to_string(), v.clone()))
            .collect();
        let again = import(&params, &config, data.clone(), Variant::Full, &Device::Cpu).unwrap();
        assert_eq!(again.metrics["correct_final"], out.metrics["correct_final"]);
    }

    #[test]
    fn a_classifier_for_another_class_count_is_refused() {
        let (config, data) = small_run();
        let err = import(
            &reference_state(&config, 50),
            &config,
            data,
            Variant::Full,
            &Device::Cpu,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("fc over 4 classes (the data set's 4 novel classes)"),
            "{err}"
        );
        assert!(err.contains("its fc has 50 rows"), "{err}");
    }
}
