"""Training under wrappers that shard or copy the model (DDP, FSDP; real DeepSpeed runs: tests/test_deepspeed.py): the
logit parameters come out of ``forward``, the ``logit_scale`` clamp reaches the optimizer's copy, the final save takes the consolidated state dict
the Trainer gathers (LoRA merged, main process only), ``_no_split_modules`` names the blocks to shard, the
example accelerate configs load, and real 2-process runs (DDP over gloo here; FSDP where accelerate allows it)
equal one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import accelerate
import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, infer_auto_device_map
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPVisionConfig, SiglipVisionConfig

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_worker  # noqa: E402
from launching import accelerate_launch  # noqa: E402
from numerics import assert_same_tensor  # noqa: E402

from llm2clip_hf import LLM2CLIPModel, LLM2CLIPTextModel  # noqa: E402
from llm2clip_hf.conversion.lora_merge import merged_state_dict  # noqa: E402
from llm2clip_hf.testing import (  # noqa: E402
    tiny_caption_pair_rows, tiny_image_caption_rows, tiny_llm2clip_config, tiny_vision_config)
from llm2clip_hf.trainers import CLIPContrastiveLoss, LLM2CLIPTrainer, LLM2CLIPTrainingArguments  # noqa: E402
from llm2clip_hf.trainers.callbacks import LogitScaleClampCallback  # noqa: E402
from llm2clip_hf.trainers.stages import default_lora_config  # noqa: E402

pytestmark = pytest.mark.slow  # several processes or whole runs: CI runs it, the fast loop (-m "not slow") does not

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "examples" / "accelerate"
WORKER = Path(__file__).with_name("fsdp_worker.py")
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
             patch_size=8)


# ------------------------------------------------------------------------------------------------ forward outputs
def test_forward_returns_the_logit_parameters_it_used_with_their_gradient(text_model):
    torch.manual_seed(0)
    model = LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), embed_text_model=False,
                                          projection_dim=32, logit_bias_init_value=-3.0)
    out = model(pixel_values=torch.randn(2, 3, 32, 32), llm_embeddings=torch.randn(2, 64))
    assert out.logit_scale.item() == model.logit_scale.item() and out.logit_bias.item() == -3.0
    logits = out.logit_scale.exp() * out.image_embeds @ out.text_embeds.t() + out.logit_bias
    torch.testing.assert_close(out.logits_per_image, logits, rtol=0, atol=1e-6)
    (out.logit_scale * 2 + out.logit_bias * 3).backward()
    assert model.logit_scale.grad.item() == 2.0 and model.logit_bias.grad.item() == 3.0
    no_bias = LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), embed_text_model=False, projection_dim=32)
    assert no_bias(pixel_values=torch.randn(1, 3, 32, 32), llm_embeddings=torch.randn(1, 64)).logit_bias is None


def test_compute_loss_takes_logit_scale_from_the_forward_output(text_model, tmp_path):
    """The loss must use the output's logit_scale (what forward saw), not the module attribute read afterwards:
    here the two differ, and the loss follows the output."""
    torch.manual_seed(0)
    model = LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), embed_text_model=False, projection_dim=32)
    args = LLM2CLIPTrainingArguments(output_dir=str(tmp_path), stage="clip", use_cpu=True, report_to="none",
                                     save_strategy="no", disable_tqdm=True)
    trainer = LLM2CLIPTrainer(model=model, args=args)
    forward = model.forward

    def forward_with_other_scale(**kwargs):
        out = forward(**kwargs)
        out.logit_scale = out.logit_scale + 1.0
        return out

    model.forward = forward_with_other_scale
    inputs = {"pixel_values": torch.randn(4, 3, 32, 32), "llm_embeddings": torch.randn(4, 64)}
    loss = trainer.compute_loss(model, inputs)
    with torch.no_grad():
        out = forward(**inputs)
        expected = CLIPContrastiveLoss()(out.image_embeds, out.text_embeds, model.logit_scale + 1.0)
        unexpected = CLIPContrastiveLoss()(out.image_embeds, out.text_embeds, model.logit_scale)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert abs(loss.item() - unexpected.item()) > 1e-3


# ------------------------------------------------------------------------------------------------ the clamp
def clamp_trainer(module, wrapped=None):
    """What the callback reads from a trainer: the wrapped model and the accelerator that unwraps it."""
    wrapped = wrapped if wrapped is not None else module
    accelerator = SimpleNamespace(unwrap_model=lambda model: module if model is wrapped else model)
    return SimpleNamespace(model_wrapped=wrapped, accelerator=accelerator, is_deepspeed_enabled=False)


def test_clamp_acts_on_the_module_inside_the_wrapper():
    module, wrapper = nn.Module(), nn.Module()
    module.logit_scale = nn.Parameter(torch.tensor(7.0))
    wrapper.logit_scale = nn.Parameter(torch.tensor(7.0))  # a stale copy must be left alone
    LogitScaleClampCallback(clamp_trainer(module, wrapper), 4.6).on_optimizer_step(None, None, None)
    assert module.logit_scale.item() == pytest.approx(4.6) and wrapper.logit_scale.item() == 7.0
    module.logit_scale.data.fill_(-1.0)
    LogitScaleClampCallback(clamp_trainer(module, wrapper), 4.6).on_optimizer_step(None, None, None)
    assert module.logit_scale.item() == 0.0


def test_clamp_refuses_a_logit_scale_that_is_no_parameter():
    """FSDP1 with use_orig_params=False leaves plain tensor views where the parameters were."""
    module = nn.Module()
    module.logit_scale = torch.tensor(7.0)
    with pytest.raises(RuntimeError, match="use_orig_params"):
        LogitScaleClampCallback(clamp_trainer(module), 4.6).on_optimizer_step(None, None, None)


# ------------------------------------------------------------------------------------------------ final save
def lora_trainer(stage, text_model, tmp_path):
    """A trainer whose model carries a LoRA with a non-zero B: stage "caption" (a PeftModel) or "clip" (LoRA
    injected into the embedded LLM)."""
    args = LLM2CLIPTrainingArguments(output_dir=str(tmp_path / "out"), stage=stage, text_source="lora",
                                     use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True)
    torch.manual_seed(0)
    if stage == "caption":
        model, data = get_peft_model(text_model, default_lora_config(args)), tiny_caption_pair_rows()[:8]
    else:
        model = LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), projection_dim=32)
        data = tiny_image_caption_rows()[:8]
    trainer = LLM2CLIPTrainer(model=model, args=args, train_dataset=Dataset.from_list(data))
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    return trainer


def consolidated(trainer):
    """A stand-in for the state dict FSDP / DeepSpeed gather: the trained model's keys, values unlike the live
    weights (so a save that read the model would show)."""
    return {k: (v.detach() + 0.25 * torch.randn_like(v.float()).to(v.dtype)) if v.is_floating_point() else v
            for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


@pytest.mark.parametrize("stage", ["caption", "clip"])
def test_save_writes_the_given_state_dict_with_lora_merged(stage, text_model, tmp_path):
    trainer = lora_trainer(stage, text_model, tmp_path)
    state = consolidated(trainer)
    prefix = "base_model.model." if stage == "caption" else ""
    scaling = trainer.args.lora_alpha / trainer.args.lora_r
    expected = {}
    for key, value in state.items():  # the LoRA formula, computed here from the raw tensors
        key = key.removeprefix(prefix)
        if ".lora_" in key:
            continue
        if key.endswith(".base_layer.weight"):
            layer = key[: -len(".base_layer.weight")]
            a = state[f"{prefix}{layer}.lora_A.default.weight"].float()
            b = state[f"{prefix}{layer}.lora_B.default.weight"].float()
            value = (value.float() + (b @ a) * scaling).to(value.dtype)
        expected[key.replace(".base_layer.", ".")] = value
    trainer._save(str(tmp_path / "saved"), state_dict=state)
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert saved.keys() == expected.keys() and any(".q_proj.weight" in k for k in saved)
    for key in saved:
        torch.testing.assert_close(saved[key], expected[key], rtol=0, atol=1e-6, msg=key)
    assert {"config.json", "README.md", "training_args.bin"} <= {p.name for p in (tmp_path / "saved").iterdir()}


def test_save_on_a_process_that_does_not_save_writes_nothing(text_model, tmp_path, monkeypatch):
    trainer = lora_trainer("clip", text_model, tmp_path)
    monkeypatch.setattr(type(trainer.args), "should_save", property(lambda self: False))
    trainer._save(str(tmp_path / "given"), state_dict=consolidated(trainer))
    trainer._save(str(tmp_path / "own"))
    assert not (tmp_path / "given").exists() and not (tmp_path / "own").exists()


# ------------------------------------------------------------------------------------------------ _no_split_modules
def tower_config(family):
    if family == "eva02":
        return tiny_vision_config(num_hidden_layers=3), {"EVA02Block"}
    if family == "clip":
        return CLIPVisionConfig(**TOWER), {"CLIPEncoderLayer", "CLIPVisionEmbeddings"}
    return SiglipVisionConfig(**TOWER), {"SiglipEncoderLayer", "SiglipVisionEmbeddings",
                                         "SiglipMultiheadAttentionPoolingHead"}


@pytest.mark.parametrize("family", ["eva02", "clip", "siglip"])
def test_no_split_modules_name_the_llm_decoder_layer_and_the_tower_block(family, text_model):
    vision, tower_classes = tower_config(family)
    torch.manual_seed(0)
    model = LLM2CLIPModel.from_text_model(text_model, vision, projection_dim=None if family == "siglip" else 32)
    assert set(model._no_split_modules) == tower_classes | {"LlamaDecoderLayer"}
    assert model.get_input_embeddings() is model.text_model.llm.embed_tokens  # accelerate's FSDP2 shards it apart
    # FSDP's transformer auto-wrap (as accelerate builds it from _no_split_modules) wraps every LLM decoder layer
    # and every tower block: 2 + 3 here.
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [name for name, module in model.named_modules() if policy(module)]
    blocks = [n for n in wrapped if type(model.get_submodule(n)).__name__ in ("LlamaDecoderLayer", "EVA02Block",
                                                                              "CLIPEncoderLayer", "SiglipEncoderLayer")]
    assert len(blocks) == text_model.config.llm_config.num_hidden_layers + 3
    # device_map="auto": a first device that ends halfway through the tower, or through the LLM, would cut a block
    # in two without _no_split_modules; with them, blocks stay whole.
    def nbytes(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())

    total = nbytes(model)
    for first_device in (nbytes(model.vision_model) // 2, total - nbytes(model.text_model) // 2):
        def cut_blocks(no_split):
            device_map = infer_auto_device_map(model, max_memory={0: first_device, "cpu": total},
                                               no_split_module_classes=no_split)
            assert len(set(device_map.values())) == 2
            return {block for name in device_map for block in blocks if name.startswith(block + ".")}

        assert cut_blocks([]) and not cut_blocks(list(model._no_split_modules))


def test_no_split_modules_without_an_embedded_llm_lists_the_tower_only():
    model = LLM2CLIPModel(tiny_llm2clip_config(text_embedding_dim=64))
    assert model._no_split_modules == {"EVA02Block"} and model.get_input_embeddings() is None


# ------------------------------------------------------------------------------------------------ accelerate configs
@pytest.mark.parametrize("name, distributed_type, check", [
    ("ddp", DistributedType.MULTI_GPU, {}),
    ("fsdp", DistributedType.FSDP, {"FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                                    "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}),
    ("deepspeed_zero1", DistributedType.DEEPSPEED, {"zero_stage": 1}),
    ("deepspeed_zero2", DistributedType.DEEPSPEED, {"zero_stage": 2}),
    ("deepspeed_zero3", DistributedType.DEEPSPEED, {"zero_stage": 3, "zero3_save_16bit_model": True,
                                                    "zero3_init_flag": False}),
])
def test_example_accelerate_configs_load(name, distributed_type, check):
    path = CONFIGS / f"{name}.yaml"
    header = path.read_text().splitlines()[:12]
    assert header[0].startswith("# ") and any(f"--config_file examples/accelerate/{name}.yaml" in line and
                                              "llm2clip_hf.cli train" in line for line in header)
    config = load_config_from_file(str(path))
    assert config.distributed_type == distributed_type
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "x.py"]))
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == (name == "ddp", name == "fsdp",
                                                                   name.startswith("deepspeed"))
    if name == "fsdp":
        from accelerate.utils.launch import prepare_multi_gpu_env

        env = prepare_multi_gpu_env(args)
        assert {k: env[k] for k in check} == check
    elif check:
        assert {k: config.deepspeed_config[k] for k in check} == check


# ------------------------------------------------------------------------------------------------ 2 processes vs 1
def launch(stage, llm_dir, output_dir, config=None, *worker_args):
    """``fsdp_worker.py`` in 2 processes: with an accelerate config file, or as DDP (gloo on a CPU)."""
    setup = ["--config_file", str(config)] if config else ["--multi_gpu", "--mixed_precision", "no",
                                                          "--dynamo_backend", "no"]
    accelerate_launch([WORKER, stage, llm_dir, output_dir, "2", *worker_args], setup=setup, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def one_process(tiny_llm_dir, tmp_path_factory):
    """The 1-process reference of each stage, run once; its saved model equals its trained, merged weights."""
    runs = {}

    def get(stage):
        if stage not in runs:
            directory = tmp_path_factory.mktemp(f"one_{stage}")
            trainer = fsdp_worker.run(stage, str(tiny_llm_dir), str(directory), 1)
            saved = load_file(directory / "model" / "model.safetensors")
            trained = merged_state_dict(trainer._base_model())
            assert saved.keys() == trained.keys()
            assert all(torch.equal(saved[k], trained[k].cpu()) for k in saved)
            runs[stage] = directory
        return runs[stage]

    return get


def assert_two_processes_equal_one(stage, one, two, fsdp):
    reports = [json.loads((two / f"run-{rank}.json").read_text()) for rank in (0, 1)]
    assert all(report["fsdp"] == fsdp for report in reports), reports
    one_losses = json.loads((one / "losses.json").read_text())
    two_losses = json.loads((two / "losses.json").read_text())
    assert len(one_losses) == fsdp_worker.STEPS
    assert two_losses == pytest.approx(one_losses, rel=1e-5)
    expected = load_file(one / "model" / "model.safetensors")
    saved = load_file(two / "model" / "model.safetensors")
    assert saved.keys() == expected.keys() and not any("lora_" in k or "base_layer" in k for k in saved)
    for key in saved:  # same shapes: FSDP trains a 1-element logit_scale, the checkpoint keeps CLIP's 0-d one
        assert saved[key].shape == expected[key].shape, key
        assert_same_tensor(saved[key], expected[key], 1e-3, key)
    model_class = LLM2CLIPModel if stage == "clip" else LLM2CLIPTextModel
    reloaded = model_class.from_pretrained(two / "model").state_dict()
    assert all(torch.equal(reloaded[k], saved[k]) for k in saved)
    # every process computes the retrieval metrics of the full model, right after training
    one_metrics = json.loads((one / "run-0.json").read_text())["metrics"]
    assert one_metrics and all(report["metrics"] == pytest.approx(one_metrics) for report in reports)
    if stage == "clip":
        # The clamp acted at step 1 (unclamped the run ends at 2.40): every process's optimizer copy is clamped,
        # and the saved value is the one that went on training from the clamp.
        final = saved["logit_scale"].item()
        assert final < fsdp_worker.LOGIT_SCALE_MAX
        local = [value for report in reports for value in report["logit_scale"]]
        assert local and all(value == pytest.approx(final, abs=1e-6) for value in local)


@pytest.mark.parametrize("stage", ["clip", "caption"])
def test_two_process_ddp_run_equals_one_process(stage, tiny_llm_dir, one_process, tmp_path):
    """Stage 2 with the LoRA'd LLM in the loop and the clamp acting, and stage 1: losses, the saved (merged) model
    and logit_scale on each process against one process on the same global batches."""
    launch(stage, tiny_llm_dir, tmp_path)
    assert_two_processes_equal_one(stage, one_process(stage), tmp_path, fsdp=False)


@pytest.mark.parametrize("stage", ["clip", "caption"])
def test_two_process_fsdp2_forced_on_cpu_equals_one_process(stage, tiny_llm_dir, one_process, tmp_path):
    """FSDP2 over gloo, forced past accelerate's GPU-only check (fsdp_worker.ForcedFSDP2Trainer): accelerate's own
    FSDP2 wrapping and full-state-dict gathering with torch's fully_shard; the clamp on the local shard (one
    process holds logit_scale's single element, the other an empty shard); the final save from the gathered state
    dict with LoRA merged. Under FSDP the trainer makes logit_scale 1-element (FSDP refuses 0-d parameters) and
    saves it 0-d, so the checkpoint reloads with from_pretrained."""
    launch(stage, tiny_llm_dir, tmp_path, None, "force-fsdp2")
    assert_two_processes_equal_one(stage, one_process(stage), tmp_path, fsdp=True)
    if stage == "clip":
        shards = [json.loads((tmp_path / f"run-{rank}.json").read_text())["logit_scale"] for rank in (0, 1)]
        assert sorted(len(shard) for shard in shards) == [0, 1]


def fsdp_unavailable() -> str | None:
    """Why accelerate cannot run FSDP with 2 processes here (None with 2 or more GPUs)."""
    if torch.cuda.device_count() >= 2:
        return None
    try:  # accelerate launch --use_fsdp passes sync_module_states=True
        FullyShardedDataParallelPlugin(fsdp_version=1, sync_module_states=True)
        fsdp1 = "no error"
    except RuntimeError as error:
        fsdp1 = f"RuntimeError: {error}"
    return (f"accelerate {accelerate.__version__} + torch {torch.__version__} run FSDP on GPUs only and this machine "
            f"has {torch.cuda.device_count()}. FSDP1 (accelerate launch --use_fsdp) stops in "
            f"FullyShardedDataParallelPlugin with {fsdp1!r}. FSDP2 (fsdp_version: 2) is silently dropped: without a "
            "GPU, AcceleratorState picks DistributedType.MULTI_CPU (gloo) and wraps the model in DDP "
            "(trainer.is_fsdp_enabled is False). Run examples/accelerate/run_fsdp_check.sh on a machine with 2+ GPUs.")


@pytest.mark.skipif(fsdp_unavailable() is not None, reason=str(fsdp_unavailable()))
@pytest.mark.parametrize("stage", ["clip", "caption"])
def test_two_process_fsdp_run_equals_one_process(stage, tiny_llm_dir, one_process, tmp_path):
    """As the DDP test, under examples/accelerate/fsdp.yaml: sharded training, the clamp on the local shard, and
    save_model() gathering a full, merged, loadable model."""
    launch(stage, tiny_llm_dir, tmp_path, config=CONFIGS / "fsdp.yaml")
    assert_two_processes_equal_one(stage, one_process(stage), tmp_path, fsdp=True)
