"""The JetFormer example (examples/jetformer) and the Jet-as-tokenizer example."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jetblocks import JetConfig
from jetblocks.integrations.sentencepiece import EOS_ID, PAD_ID, SentencePieceTokenizer
from jetblocks.train import TrainConfig

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from examples.jetformer import run as run_module  # noqa: E402
from examples.jetformer.__main__ import build_parser, main  # noqa: E402
from examples.jetformer.data import layout_captions, shapes_dataset  # noqa: E402
from examples.jetformer.model import JetFormer, JetFormerConfig, meta_parameter_counts  # noqa: E402
from examples.jetformer.presets import PRESETS  # noqa: E402
from examples.jetformer.sampling import sample_image_tokens  # noqa: E402
from examples.jetformer.task import jetformer_optimizer  # noqa: E402

SMALL = JetFormerConfig(
    jet=JetConfig(
        image_size=(8, 8), channels=1, patch_size=2, depth=2, emb_dim=8, num_heads=2,
        kinds=("channels",),
    ).to_dict(),
    keep=2, width=32, depth=2, mlp_dim=64, num_heads=4, head_dim=8, num_mixtures=3,
    vocab_size=10, text_len=1, num_vocab_repeats=4,
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(config=SMALL, seed=0):
    torch.manual_seed(seed)
    model = JetFormer(config).eval()
    with torch.no_grad():  # leave the zero/identity initialisation so everything matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("learned_positions", [False, True])
@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_kv_cache_sampling_gives_the_tokens_of_full_recomputation(guidance, learned_positions):
    model = small_model(dataclasses.replace(SMALL, learned_positions=learned_positions))
    text = torch.tensor([[3], [7], [0]])
    tokens = [
        sample_image_tokens(
            model,
            text,
            guidance=guidance,
            temperature=0.9,
            generator=torch.Generator().manual_seed(0),
            use_cache=use_cache,
        )
        for use_cache in (True, False)
    ]
    assert tokens[0].shape == (3, 16, 2)
    # Guidance divides by (1 + w) / sigma_c^2 - w / sigma_u^2, which can nearly cancel: the
    # float32 rounding of the two paths' hidden states (1e-6) then grows to 1e-4 relative
    # in a few tokens of magnitude ~1e3 (seen on AVX2 CPUs).
    rtol = 1e-5 if guidance == 0 else 1e-3
    torch.testing.assert_close(tokens[0], tokens[1], atol=1e-5, rtol=rtol)


def test_learned_positions_embed_each_position_id_and_start_at_zero():
    plain = JetFormer(SMALL)
    assert plain.decoder.position_embedding is None
    config = dataclasses.replace(SMALL, learned_positions=True)
    model = JetFormer(config)
    table = model.decoder.position_embedding.weight
    assert table.shape == (1 + 4 + 1 + 16, 32) and not table.any()  # starts as RoPE alone
    model = small_model(config)
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        base = model.decoder(x)
        model.decoder.position_embedding.weight[3].add_(1.0)  # only position 3 changes
        moved = model.decoder(x)
    assert torch.equal(base[:, :3], moved[:, :3])  # causal: earlier positions do not see it
    assert not torch.allclose(base[:, 3:], moved[:, 3:])


def test_kv_cache_sampling_under_bf16_autocast():
    model = small_model()
    with torch.autocast("cpu", torch.bfloat16):
        tokens = sample_image_tokens(
            model, torch.tensor([[1], [2]]), guidance=1.0, generator=torch.Generator()
        )
    assert tokens.shape == (2, 16, 2) and torch.isfinite(tokens).all()


def test_dropout_is_on_in_training_and_off_in_evaluation():
    model = small_model(dataclasses.replace(SMALL, dropout=0.5))
    text_first = torch.ones(4, dtype=torch.bool)
    with torch.no_grad():
        evaluated = [batch_losses(model.eval(), text_first)["image_bits"] for _ in range(2)]
        trained = [batch_losses(model.train(), text_first)["image_bits"] for _ in range(2)]
    torch.testing.assert_close(evaluated[0], evaluated[1])
    assert not torch.allclose(trained[0], trained[1])
    assert not torch.allclose(trained[0], evaluated[0])
    blocks = model.decoder.blocks
    assert all(block.drop.p == 0.5 for block in blocks)


def test_input_noise_reaches_text_first_rows_in_training_only():
    noisy = small_model(dataclasses.replace(SMALL, input_noise_std=0.3))
    clean = small_model()
    text_first = torch.tensor([True, True, False, False])

    def losses(model, seed):
        with torch.no_grad():
            return batch_losses(model, text_first, generator=torch.Generator().manual_seed(seed))

    reference = losses(clean.train(), 0)
    first, second = losses(noisy.train(), 0), losses(noisy.train(), 1)
    assert (first["image_bits"][:2] - reference["image_bits"][:2]).abs().min() > 0
    assert not torch.allclose(first["image_bits"][:2], second["image_bits"][:2])
    # image-first (captioning) rows see clean tokens: their caption loss is untouched
    torch.testing.assert_close(first["text_nll"][2:], reference["text_nll"][2:])
    torch.testing.assert_close(losses(noisy.eval(), 0), losses(clean.eval(), 0))


def test_untied_text_output_has_its_own_layer_with_the_reference_init():
    config = dataclasses.replace(SMALL, num_vocab_repeats=1, untie_output_vocab=True)
    model = JetFormer(config)
    assert model.text_out.weight.shape == (config.total_vocab, config.width)
    assert abs(model.text_out.weight.std().item() - 1.0) < 0.1 and not model.text_out.bias.any()
    h = torch.randn(2, 3, config.width)
    torch.testing.assert_close(model.text_logits(h), model.text_out(h))
    tied = JetFormer(dataclasses.replace(config, untie_output_vocab=False))
    assert tied.text_out is None
    torch.testing.assert_close(tied.text_logits(h), h @ tied.text_embed.weight.T)
    with pytest.raises(ValueError, match="untie_output_vocab needs num_vocab_repeats == 1"):
        dataclasses.replace(SMALL, untie_output_vocab=True)


def test_decoder_and_image_embedding_use_lecun_truncated_normal_init():
    torch.manual_seed(0)
    config = dataclasses.replace(SMALL, width=256, mlp_dim=512, head_dim=64)
    model = JetFormer(config)
    layers = [
        model.image_embed,
        model.decoder.blocks[0].attn.query,
        model.decoder.blocks[1].mlp.down,
    ]
    for layer in layers:
        fan_in = layer.weight.shape[1]
        std = layer.weight.std().item()
        assert abs(std * fan_in**0.5 - 1.0) < 0.08, (layer, std * fan_in**0.5)
        bound = 2 / 0.87962566103423978 / fan_in**0.5  # truncated at 2 sigma of the normal
        assert layer.weight.abs().max().item() <= bound + 1e-6
    assert not model.image_embed.bias.any()
    head = JetFormer(dataclasses.replace(SMALL, head_mean_init_std=0.0)).head
    assert not head.proj.weight.any() and not head.proj.bias.any()  # the reference's zeros
    assert JetFormer(SMALL).head.proj.bias.abs().sum() > 0  # the default breaks the symmetry


def test_padding_layouts_and_masked_pads_change_nothing():
    ids = torch.tensor([[5, 6, EOS_ID, PAD_ID, PAD_ID], [7, EOS_ID, PAD_ID, PAD_ID, PAD_ID]])
    with_eos = ids != PAD_ID
    text, loss, mask = layout_captions(ids, with_eos, EOS_ID, ignore_pad=False)
    assert text.tolist() == [[5, 6, EOS_ID, EOS_ID, EOS_ID], [7, EOS_ID, EOS_ID, EOS_ID, EOS_ID]]
    assert loss.all() and mask.all()
    text, loss, mask = layout_captions(ids, with_eos, EOS_ID, ignore_pad=True)
    assert torch.equal(text, ids) and torch.equal(loss, with_eos)
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    # masked pads are invisible: other ids there change no loss and no sampled token
    config = dataclasses.replace(SMALL, text_len=5, num_vocab_repeats=1, vocab_size=12)
    model = small_model(config)
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    other = torch.where(mask, text, torch.full_like(text, 9))  # EOS and pads changed
    other_pads = torch.where(loss, text, torch.full_like(text, 9))  # pads (not targets) changed
    with torch.no_grad():
        ones = torch.ones(2, dtype=torch.bool)
        image_bits = [
            model(images, t, loss, ones, text_mask=mask)["image_bits"] for t in (text, other)
        ]
        text_nll = [
            model(images, t, loss, ~ones, text_mask=mask)["text_nll"] for t in (text, other_pads)
        ]
        unmasked = model(images, other, loss, ones)["image_bits"]
    torch.testing.assert_close(image_bits[0], image_bits[1])
    torch.testing.assert_close(text_nll[0], text_nll[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(image_bits[0], unmasked)  # without the mask the pads are seen
    tokens = [
        sample_image_tokens(
            model,
            prompt,
            text_mask=mask,
            guidance=guidance,
            temperature=0.9,
            generator=torch.Generator().manual_seed(0),
            use_cache=use_cache,
        )
        for prompt in (text, other)
        for guidance in (0.0, 2.0)
        for use_cache in (True, False)
    ]
    for got in tokens[1:4]:  # cache or not, with or without guidance: the tokens of row 0
        assert got.shape == tokens[0].shape
    for plain, padded in zip(tokens[:4], tokens[4:], strict=True):
        torch.testing.assert_close(plain, padded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[0], tokens[1], atol=1e-5, rtol=1e-5)
    # a padded prompt samples what the same prompt without any padding does (positions skip
    # pads); unguided: the unconditional prompt is text_len NOLABEL tokens, as the reference
    short, padded = (
        sample_image_tokens(
            model, prompt, text_mask=prompt_mask, generator=torch.Generator().manual_seed(0)
        )
        for prompt, prompt_mask in ((text[:1, :2], None), (text[:1], mask[:1]))
    )
    torch.testing.assert_close(short, padded, atol=1e-5, rtol=1e-5)


def test_rejection_sampler_runs_through_the_example():
    model = small_model()
    tokens = sample_image_tokens(
        model, torch.tensor([[3], [7]]), guidance=3.0, temperature=0.94, sampler="rejection",
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert tokens.shape == (2, 16, 2) and torch.isfinite(tokens).all()


def batch_losses(model, text_first, drop=None, generator=None):
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    text = torch.tensor([[1], [2], [3], [4]])
    mask = torch.ones(4, 1, dtype=torch.bool)
    return model(images, text, mask, text_first, drop, generator=generator)


def test_image_first_examples_do_not_train_jet():
    model = small_model()
    out = batch_losses(model, torch.zeros(4, dtype=torch.bool))
    out["text_nll"].mean().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.jet.parameters())
    assert model.decoder.blocks[0].attn.query.weight.grad.abs().sum() > 0
    model.zero_grad()
    out = batch_losses(model, torch.ones(4, dtype=torch.bool))
    out["image_bits"].mean().backward()
    assert all(p.grad.abs().sum() > 0 for p in model.jet.parameters())


def test_dropped_prefixes_are_nolabel_runs_with_repeated_embeddings():
    model = small_model()
    text = torch.tensor([[1], [2]])
    embedded = model.embed_text(text, drop=torch.tensor([False, True]))
    assert embedded.shape == (2, 4, 32)  # one label, 4 distinct rows
    rows = torch.arange(4) * SMALL.total_vocab
    torch.testing.assert_close(embedded[0], model.text_embed.weight[1 + rows])
    torch.testing.assert_close(embedded[1], model.text_embed.weight[SMALL.nolabel_id + rows])
    # a dropped prefix changes the image loss; the losses stay finite
    with torch.no_grad():
        ones = torch.ones(4, dtype=torch.bool)
        torch.manual_seed(0)
        kept = batch_losses(model, ones)["image_bits"]
        torch.manual_seed(0)
        dropped = batch_losses(model, ones, drop=ones)["image_bits"]
    assert torch.isfinite(dropped).all() and not torch.allclose(kept, dropped)


def test_weight_decay_goes_to_kernels_only():
    model = small_model()
    config = TrainConfig(lr=1e-3, weight_decay=1e-4)
    decayed, rest = jetformer_optimizer(model, config).param_groups
    assert decayed["weight_decay"] == pytest.approx(0.1)
    kernels = {id(p) for p in decayed["params"]}
    assert id(model.decoder.blocks[0].mlp.gate.weight) in kernels
    assert id(model.head.proj.weight) in kernels and id(model.image_embed.weight) in kernels
    for p in (model.text_embed.weight, model.head.proj.bias, model.decoder.final_norm.scale):
        assert id(p) not in kernels
    assert rest["weight_decay"] == 0.0
    assert len(kernels) + len(rest["params"]) == len(list(model.parameters()))


def test_preset_parameter_counts_match_the_spec():
    def counts(name):
        model = dict(PRESETS[name]["model"], vocab_size=PRESETS[name]["model"]["vocab_size"] or 64)
        return meta_parameter_counts(JetFormerConfig(**model))

    assert counts("cifar10-42m")["total"] == pytest.approx(42e6, rel=0.02)
    small = counts("imagenet256-350m")
    assert small["decoder"] == pytest.approx(350e6, rel=0.02)
    assert small["jet"] == pytest.approx(0.43e9, rel=0.02)
    assert counts("imagenet256-1.3b")["jet"] == pytest.approx(0.63e9, rel=0.02)
    # text-to-image: the GIVT decoders (750M only here), the reference's recipe
    assert counts("text256-750m")["decoder"] == pytest.approx(800e6, rel=0.01)
    for name in ("text256-350m", "text256-750m", "text256-1.3b"):
        model, task = PRESETS[name]["model"], PRESETS[name]["task"]
        assert (model["text_len"], model["untie_output_vocab"], model["dropout"]) == (64, True, 0.1)
        assert (task["text_first_prob"], task["text_weight"]) == (0.5, 0.0025)
        assert task["rgb_noise_on_image_prefix"] is False and task["sigma_end"] == 3.0
        assert PRESETS[name]["sample"]["sampler"] == "rejection"
    assert PRESETS["imagenet256-350m"]["flip"] and not PRESETS["text256-350m"].get("flip")


def test_sentencepiece_tokenizer_round_trip(tmp_path):
    _, _, captions = shapes_dataset(300, seed=0)
    tokenizer = SentencePieceTokenizer.train(captions, 64, model_type="word")
    path = tokenizer.save(tmp_path / "tokenizer.model")
    loaded = SentencePieceTokenizer.load(path)
    assert loaded.vocab_size == tokenizer.vocab_size < 64
    ids, mask = loaded.encode_batch(captions[:5], 16)
    assert ids.shape == mask.shape == (5, 16)
    for row, caption in enumerate(captions[:5]):
        length = int(mask[row].sum())
        assert ids[row, length - 1] == EOS_ID and (ids[row, length:] == PAD_ID).all()
        assert loaded.decode(ids[row].tolist()) == caption


def test_a_t5_numbered_tokenizer_like_the_references_c4_en_loads(tmp_path):
    """pad 0, eos 1, unk 2 (T5's numbering): the ids are read from the model."""
    import io

    import sentencepiece

    _, _, captions = shapes_dataset(300, seed=0)
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=proto, vocab_size=40, model_type="word",
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )  # fmt: skip
    tokenizer = SentencePieceTokenizer(proto.getvalue())
    assert (tokenizer.pad_id, tokenizer.eos_id) == (0, 1)
    ids, mask = tokenizer.encode_batch(captions[:3], 16)
    length = int(mask[0].sum())
    assert ids[0, length - 1] == 1 and (ids[0, length:] == 0).all()
    assert tokenizer.decode(ids[0].tolist()) == captions[0]


def test_shapes_dataset_draws_varied_captioned_scenes():
    # reading them back (pixels and captions): tests/test_jetformer_benchmarks.py
    images, scenes, captions = shapes_dataset(400, seed=3)
    assert images.shape == (400, 3, 16, 16) and images.dtype == torch.uint8
    assert len(scenes) == len(captions) == 400
    assert len(set(captions)) > 300  # caption variety


def test_the_command_line_is_train_sample_caption_and_presets(capsys):
    """Measuring a run is benchmarks/jetformer_measure.py, not a command of the example."""
    assert "{train,sample,caption,presets}" in build_parser().format_help()
    with pytest.raises(SystemExit) as stopped:
        main(["measure", "--run", "r"])
    assert stopped.value.code == 2 and "invalid choice: 'measure'" in capsys.readouterr().err


def test_text_preset_trains_samples_and_captions(tmp_path, capsys, monkeypatch):
    """A smoke run of every command on the text preset, with less data and fewer samples
    (its measurement: tests/test_jetformer_benchmarks.py)."""
    monkeypatch.setattr(run_module, "SHAPES_TRAIN", 256)
    monkeypatch.setattr(run_module, "SHAPES_TEST", 40)
    small_grid = dict(sample_temperatures=(1.0,), samples_per_temperature=2)
    monkeypatch.setitem(PRESETS["cpu-tiny-text"], "train", {**PRESETS["cpu-tiny-text"]["train"],
                                                            **small_grid})  # fmt: skip
    run = tmp_path / "text"
    assert main(["train", "--preset", "cpu-tiny-text", "--steps", "2", "--out", str(run),
                 "--no-progress", "--eval-batch-size", "40"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out.splitlines()[-2])
    assert summary["step"] == 2 and summary["eval_bits_per_dim"] < 10
    assert {p.name for p in run.iterdir()} >= {"run.json", "tokenizer.model", "checkpoints"}
    assert (run / "samples" / "step_00000002.png").is_file()
    assert (
        main(
            [
                "sample",
                "--run",
                str(run),
                "--per-prompt",
                "2",
                "--out",
                str(tmp_path / "grid.png"),
                "--prompt",
                "a red square above a blue circle",
            ]
        )
        == 0
    )
    assert main(["caption", "--run", str(run), "--n", "2"]) == 0
    # resuming a finished run continues from its checkpoint
    assert main(["train", "--preset", "cpu-tiny-text", "--out", str(run), "--resume",
                 "--no-progress"]) == 0  # fmt: skip


def test_jet_as_tokenizer_example_runs_and_reproduces_its_number(tmp_path):
    summaries = []
    for run in ("a", "b"):
        result = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "jet_as_tokenizer.py"), "--steps", "3",
             "--batch-size", "8", "--held-out", "32", "--samples", "2", "--threads", "1",
             "--out", str(tmp_path / run)],
            capture_output=True, text=True, check=True, timeout=600,
        )  # fmt: skip
        found = re.search(r"after 3 steps: ([\d.]+) \(before: ([\d.]+)\)", result.stdout)
        assert found and float(found[1]) < float(found[2])
        assert (tmp_path / run / "samples.png").is_file()
        summaries.append(json.loads((tmp_path / run / "summary.json").read_text()))
    assert summaries[0]["threads"] == 1 and summaries[0]["seed"] == 0
    assert summaries[0]["held_out_bits_per_dim"] == summaries[1]["held_out_bits_per_dim"]


@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_digits_preset_trains_with_labels_or_captions(tmp_path, conditioning, monkeypatch):
    # its measurement (class consistency): tests/test_jetformer_benchmarks.py
    small_grid = dict(sample_temperatures=(1.0,), samples_per_temperature=2)
    train = {**PRESETS["cpu-tiny-digits"]["train"], **small_grid}
    monkeypatch.setitem(PRESETS["cpu-tiny-digits"], "train", train)
    run = tmp_path / conditioning
    args = ["--preset", "cpu-tiny-digits", "--steps", "2", "--conditioning", conditioning]
    assert main(["train", *args, "--out", str(run), "--no-progress", "--diagnose-every", "1"]) == 0
    run_spec = json.loads((run / "run.json").read_text())["spec"]
    assert run_spec["conditioning"] == conditioning
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    diagnosed = [r["diagnostics"] for r in records if "diagnostics" in r]
    assert len(diagnosed) == 2 and len(diagnosed[-1]["couplings"]) == 16  # the Jet's
    apart = diagnosed[-1]["jetformer"]  # text and image losses apart
    assert apart["image_bits_per_dim"] > 0 and ("text_nll" in apart) == (conditioning == "text")
    assert (run / "tokenizer.model").is_file() == (conditioning == "text")


def test_synthetic_data_for_throughput_runs(tmp_path):
    spec = dict(PRESETS["cifar10-42m"], data="synthetic")
    data = run_module.RunData(spec, tmp_path, create_tokenizer=False)
    batch = data.train.batch([0, 1, 2])
    assert batch["image"].shape == (3, 3, 32, 32) and batch["image"].dtype == torch.uint8
    assert len(data.train) == 4096 and len(data.test) == 512
    assert data.model_config().jet_config.image_size == (32, 32)


# --- captioned folders, --tokenizer, synthetic captions, flips -------------------------------


def tiny_text_spec(data, **model):
    """``cpu-tiny-text`` with a 16x16 RGB Jet of 2 couplings on ``data``."""
    spec = json.loads(json.dumps(PRESETS["cpu-tiny-text"]))
    jet = JetConfig(image_size=(16, 16), channels=3, patch_size=4, depth=2, emb_dim=8,
                    num_heads=2, kinds=("channels",)).to_dict()  # fmt: skip
    spec["model"].update(jet=jet, width=32, depth=1, mlp_dim=64, num_heads=2, head_dim=16,
                         num_mixtures=2, **model)  # fmt: skip
    return dict(spec, data=str(data))


def write_captioned_folder(root, count=12, size=20, lines=None):
    """``count`` PNGs ``img_00.png``... of ``size`` pixels under ``root`` and their captions."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    captions = [f"picture number {i} of a {('red', 'blue')[i % 2]} thing" for i in range(count)]
    for i in range(count):
        pixels = torch.full((size, size, 3), 10 * i, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"img_{i:02d}.png")
    if lines is None:
        lines = [json.dumps({"file": f"img_{i:02d}.png", "caption": c})
                 for i, c in enumerate(captions)]  # fmt: skip
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return captions


def test_captioned_folder_round_trip(tmp_path):
    captions = write_captioned_folder(tmp_path / "folder", count=12)
    # a second caption of a file is ignored: the first one counts
    with open(tmp_path / "folder" / "captions.jsonl", "a") as handle:
        handle.write(json.dumps({"file": "img_00.png", "caption": "another caption"}) + "\n")
    data = run_module.RunData(tiny_text_spec(tmp_path / "folder"), tmp_path, True)
    assert len(data.train) == 11 and len(data.test) == 1  # the last 5%, at least one
    assert data.test_captions == captions[11:]
    assert data.prompt_texts == captions[11:]
    batch = data.train.batch([0, 3])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["image"].dtype == torch.uint8
    assert batch["image"][1].float().mean() == pytest.approx(30, abs=1)  # img_03, resized
    assert batch["text"].shape == batch["text_loss"].shape == batch["text_mask"].shape == (2, 16)
    assert data.tokenizer.decode(batch["text"][0].tolist()) == captions[0]
    assert data.test.images[:1].shape == (1, 3, 16, 16)  # images load when indexed
    assert data.model_config().vocab_size == data.tokenizer.vocab_size
    # train/ and test/ subfolders with their own captions are the splits
    write_captioned_folder(tmp_path / "split" / "train", count=4)
    test_captions = write_captioned_folder(tmp_path / "split" / "test", count=2)
    data = run_module.RunData(tiny_text_spec(tmp_path / "split"), tmp_path, True)
    assert (len(data.train), len(data.test)) == (4, 2) and data.test_captions == test_captions


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"file": "img_00.png", "caption": "a"}', "{not json"], r"captions.jsonl, line 2"),
        (['{"file": "img_00.png"}'], r"captions.jsonl, line 1: expected"),
        (['{"file": "img_00.png", "caption": "a"}'], r"img_01.png has no caption"),
        ([*(json.dumps({"file": f"img_{i:02d}.png", "caption": "x"}) for i in range(2)),
          '{"file": "gone.png", "caption": "b"}'], r"line 3: gone.png is not an image"),
    ],
)  # fmt: skip
def test_captioned_folder_errors_name_the_file_and_line(tmp_path, lines, message):
    write_captioned_folder(tmp_path / "folder", count=2, lines=lines)
    with pytest.raises(ValueError, match=message):
        run_module.RunData(tiny_text_spec(tmp_path / "folder"), tmp_path, True)


def test_text256_presets_need_a_captioned_folder_and_a_matching_tokenizer(tmp_path):
    spec = dict(PRESETS["text256-350m"])
    with pytest.raises(ValueError, match=r"'captions256'.*text256 presets need --data"):
        run_module.RunData(spec, tmp_path, True)
    write_captioned_folder(tmp_path / "folder", count=4)
    spec = tiny_text_spec(tmp_path / "folder", vocab_size=32_000)
    with pytest.raises(
        ValueError, match=r"vocab_size is 32000 .* has \d+ pieces: pass --tokenizer"
    ):
        run_module.RunData(spec, tmp_path, True)
    with pytest.raises(ValueError, match=r"--set model.vocab_size=null"):
        run_module.RunData(spec, tmp_path, True)


def test_train_with_an_existing_tokenizer(tmp_path, capsys, monkeypatch):
    captions = write_captioned_folder(tmp_path / "folder", count=12)
    tokenizer = SentencePieceTokenizer.train([*captions, "words only the given one knows"], 64,
                                             model_type="word")  # fmt: skip
    path = tokenizer.save(tmp_path / "given.model")
    # the preset's vocab_size must equal the tokenizer's
    spec = tiny_text_spec(tmp_path / "folder", vocab_size=tokenizer.vocab_size + 1)
    with pytest.raises(ValueError, match=rf"{tokenizer.vocab_size + 1} but tokenizer .*given"):
        run_module.RunData(spec, tmp_path, True, tokenizer=path)
    spec["model"]["vocab_size"] = tokenizer.vocab_size
    data = run_module.RunData(spec, tmp_path, True, tokenizer=path)
    assert data.tokenizer.model_proto == tokenizer.model_proto
    # end to end: the tiny folder, two steps, the tokenizer copied into the run
    small = tiny_text_spec(tmp_path / "folder")
    small["train"].update(sample_temperatures=(1.0,), samples_per_temperature=1)
    monkeypatch.setitem(PRESETS, "cpu-tiny-text", small)
    run = tmp_path / "run"
    assert main(["train", "--preset", "cpu-tiny-text", "--steps", "2", "--batch-size", "4",
                 "--out", str(run), "--no-progress", "--tokenizer", str(path)]) == 0  # fmt: skip
    assert (run / "tokenizer.model").read_bytes() == path.read_bytes()
    _, loaded = run_module.load_run(run)
    assert loaded.tokenizer.vocab_size == tokenizer.vocab_size and len(loaded.test) == 1
    assert main(["train", "--preset", "cpu-tiny-digits", "--steps", "2", "--out",
                 str(tmp_path / "class"), "--tokenizer", str(path)]) == 2  # fmt: skip
    assert "only for text conditioning" in capsys.readouterr().err


def test_synthetic_captioned_data_for_throughput_runs(tmp_path):
    spec = tiny_text_spec("synthetic")
    data = run_module.RunData(spec, tmp_path, create_tokenizer=True)
    assert len(data.train) == 4096 and len(data.test) == 512
    batch = data.train.batch([0, 1])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["text"].shape == (2, 16)
    again = run_module.RunData(spec, tmp_path, create_tokenizer=True)
    assert again.test_captions == data.test_captions and len(set(data.test_captions)) > 500
    assert torch.equal(again.train.images, data.train.images)


def test_flip_presets_flip_training_batches_only(tmp_path):
    class Env:
        rank, world_size = 0, 1

    spec = dict(PRESETS["cpu-tiny-digits"], data="synthetic")

    def batches(flip, split, training):
        data = run_module.RunData(dict(spec, flip=flip), tmp_path, create_tokenizer=False)
        loader = data.loader(split, 64, Env(), seed=0, training=training)
        return [batch for batch, _ in zip(loader, range(3), strict=False)]

    plain, flipped = batches(False, "train", True), batches(True, "train", True)
    mirrored = 0
    for a, b in zip(plain, flipped, strict=True):
        assert torch.equal(a["label"], b["label"])
        same = (a["image"] == b["image"]).flatten(1).all(1)
        mirror = (a["image"].flip(-1) == b["image"]).flatten(1).all(1)
        assert (same | mirror).all()
        mirrored += int((mirror & ~same).sum())
    assert 0.3 * 3 * 64 < mirrored < 0.7 * 3 * 64
    for a, b in zip(batches(False, "test", False), batches(True, "test", False), strict=True):
        assert torch.equal(a["image"], b["image"])


def test_set_overrides_known_fields_and_names_the_unknown(tmp_path, capsys):
    from examples.jetformer.__main__ import apply_setting

    spec = {"model": {}, "train": {}, "task": {}, "sample": {}}
    apply_setting(spec, "model.dropout=0.1")
    apply_setting(spec, "model.vocab_size=null")
    assert spec["model"] == {"dropout": 0.1, "vocab_size": None}
    assert main(["train", "--set", "model.drop_out=0.1", "--out", str(tmp_path / "r")]) == 2
    assert "model has no 'drop_out'" in capsys.readouterr().err
