"""``lowbit inspect``: the per-layer table of a saved artifact, its size, calibration record and quantized inputs."""

from __future__ import annotations

import argparse

from lowbit.cli import load_model_from_source


def describe_calibration(record: dict) -> list[str]:
    """Lines of ``lowbit inspect`` for a model's calibration record (``lowbit.nn.state.CALIBRATION_ATTR``)."""
    lines = []
    steps = []
    for step in record.get("schedule") or []:
        if "stack" in step:
            dtype = f", {step['dtype']} passes" if step.get("dtype") else ""
            steps.append(f"{step['stack']} ({step['blocks']} blocks, {step['tokens']:,} tokens or positions{dtype})")
        elif step.get("one_pass"):
            steps.append(f"{len(step['layers'])} layer(s) in one pass of the model")
        else:
            steps.append(", ".join(step.get("layers") or []))
    if steps:
        lines.append("calibration: " + " -> ".join(steps))
    for change, names in (record.get("fallbacks") or {}).items():
        lines.append(f"algorithm fallback {change}: {', '.join(names)}")
    if record.get("tied"):
        lines.append(f"tied: {record['tied'][0]} shares the quantized {record['tied'][1]}")
    experts = record.get("experts")
    if isinstance(experts, dict):
        lines.append(f"experts: {experts.get('linears')} expert linears calibrated on {experts.get('min_tokens')} .. "
                     f"{experts.get('max_tokens')} tokens each (median {experts.get('median_tokens')}), "
                     f"{experts.get('no_tokens')} on none")
    rec = record.get("reconstruct")
    if isinstance(rec, dict) and isinstance(rec.get("error_ratio"), dict):
        shown = ", ".join(f"{k} {v:.3g}x" for k, v in rec["error_ratio"].items())
        lines.append(f"block reconstruction: {rec.get('units')} unit(s), output error vs before: {shown}")
    return lines


def cmd_inspect(a: argparse.Namespace) -> int:
    from lowbit.evaluation import format_table, layer_table, model_size
    from lowbit.io import load, read_manifest

    manifest = read_manifest(a.path)
    model = load(a.path)
    ref = None
    source = manifest.get("source")
    if source is not None and source.get("type") == "hf-config" and not a.no_reference:
        print(f"no float reference: {a.path} was saved from Python and records the class {source.get('class')} "
              f"and its config, not where its float weights are (error columns left empty)")
    elif not a.no_reference and source is not None:
        ref = load_model_from_source(source).model
        transforms = (manifest.get("plan") or {}).get("transforms") or []
        if transforms:  # compare each layer with the float weight it was made from: the transformed one
            from lowbit.transforms import apply_transforms

            apply_transforms(ref, transforms)
    print(format_table(layer_table(model, ref)))
    print(model_size(model).describe())
    calibration = (manifest.get("extra") or {}).get("calibration")
    if isinstance(calibration, dict):
        for line in describe_calibration(calibration):
            print(line)
    inputs = (manifest.get("extra") or {}).get("inputs")
    if isinstance(inputs, dict) and inputs:  # checked by load() above
        print(f"quantized inputs of {len(inputs)} module(s) without weights (lowbit.nn.input_quant):")
        for name, r in inputs.items():
            span = "" if r["lo"] is None else f" [{r['lo']:.4g}, {r['hi']:.4g}]"
            print(f"  {name}: {r['act']['spec']} {'dynamic' if r['act'].get('dynamic', True) else 'static'}{span}")
    return 0
