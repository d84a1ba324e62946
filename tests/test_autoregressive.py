"""The library's autoregressive pieces with a tiny KV-cached decoder written here."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jetblocks import GMMHead, Jet, JetConfig, merge_tokens, rng
from jetblocks.autoregressive import (
    KVCache,
    add_input_noise,
    causal_mask,
    decode_soft_tokens,
    generate,
    sample_soft_tokens,
    shift_right,
    soft_token_nll,
)


class TinyDecoder(nn.Module):
    """Two layers of single-head causal attention with a KV cache and learned positions."""

    def __init__(self, width=8, depth=2, max_len=32):
        super().__init__()
        self.qkv = nn.ModuleList(nn.Linear(width, 3 * width) for _ in range(depth))
        self.position = nn.Parameter(torch.randn(max_len, width))

    def forward(self, x, cache=None):
        start = cache.length if cache is not None else 0
        x = x + self.position[start : start + x.shape[1]]
        for layer, qkv in enumerate(self.qkv):
            q, k, v = (t[:, None] for t in qkv(x).chunk(3, dim=-1))
            if cache is not None:
                k, v = cache.update(layer, k, v)
            mask = causal_mask(q.shape[2], k.shape[2])
            x = x + F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[:, 0]
        if cache is not None:
            cache.advance(q.shape[2])
        return x

    def new_cache(self, max_len):
        return KVCache(len(self.qkv), max_len)


def perturbed_parts(width=8, keep=3, seed=0):
    torch.manual_seed(seed)
    head = GMMHead(width, 4, keep)
    with torch.no_grad():
        head.proj.weight.normal_(0, 0.3)
    return TinyDecoder(width), head, nn.Linear(keep, width)


def test_causal_mask_lets_each_new_query_see_the_cache_and_earlier_queries():
    assert causal_mask(3).tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert causal_mask(2, 4).tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    with pytest.raises(ValueError, match="3 queries cannot follow 2 keys"):
        causal_mask(3, 2)


def test_shift_right_puts_the_start_first_and_drops_the_last_token():
    x, start = torch.randn(2, 5, 4), torch.randn(2, 3, 4)
    out = shift_right(x, start)
    assert out.shape == (2, 7, 4)
    assert torch.equal(out[:, :3], start) and torch.equal(out[:, 3:], x[:, :4])
    shared = shift_right(x, start[0])  # one start for every row
    assert torch.equal(shared[:, :3], start[:1].expand(2, -1, -1)) and torch.equal(
        shared[:, 3:], x[:, :4]
    )
    with pytest.raises(ValueError, match=r"start \[2, 3, 5\] does not match x \[2, 5, 4\]"):
        shift_right(x, torch.randn(2, 3, 5))


def test_soft_token_nll_is_causal_and_scores_the_clean_targets():
    decoder, head, embed = perturbed_parts()
    kept, prefix = torch.randn(2, 6, 3), torch.randn(2, 2, 8)
    nll = soft_token_nll(decoder, head, embed, kept, prefix)
    assert nll.shape == (2, 6)
    changed = kept.clone()
    changed[:, 3] += 1.0
    after = soft_token_nll(decoder, head, embed, changed, prefix)
    torch.testing.assert_close(after[:, :3], nll[:, :3])  # earlier tokens do not see token 3
    assert (after[:, 3:] - nll[:, 3:]).abs().min() > 0  # token 3 itself and later ones do
    # by hand: the head at position S - 1 + t scores token t
    h = decoder(torch.cat([prefix, embed(kept[:, :-1])], dim=1))
    torch.testing.assert_close(nll, head.nll(h[:, 1:], kept))


def test_input_noise_has_a_uniform_per_example_std_up_to_the_maximum():
    tokens = torch.randn(4000, 256, 3)
    noisy = add_input_noise(tokens, 0.3, generator=torch.Generator().manual_seed(0))
    stds = (noisy - tokens).flatten(1).std(1)  # one std per example
    assert stds.max() < 0.3 * 1.15 and stds.min() < 0.02
    assert abs(stds.mean().item() - 0.15) < 0.005  # U[0, 0.3]: mean 0.15
    assert abs((stds < 0.15).float().mean().item() - 0.5) < 0.03  # and median 0.15
    assert torch.equal(add_input_noise(tokens, 0.0), tokens)
    with pytest.raises(ValueError, match="max_std must be a finite number >= 0"):
        add_input_noise(tokens, -0.1)


@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_kv_cached_sampling_gives_the_tokens_of_full_recomputation(guidance):
    decoder, head, embed = perturbed_parts()
    prefix, uncond = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    tokens = [
        sample_soft_tokens(
            decoder,
            head,
            embed,
            prefix,
            7,
            uncond_prefix=uncond,
            guidance=guidance,
            temperature=0.8,
            use_cache=use_cache,
            generator=torch.Generator().manual_seed(1),
        )
        for use_cache in (True, False)
    ]
    assert tokens[0].shape == (3, 7, 3)
    torch.testing.assert_close(tokens[0], tokens[1], atol=1e-5, rtol=1e-5)


def test_sampling_follows_the_head_token_by_token():
    decoder, head, embed = perturbed_parts()
    prefix = torch.randn(2, 2, 8)
    tokens = sample_soft_tokens(
        decoder, head, embed, prefix, 4, generator=torch.Generator().manual_seed(3)
    )
    replay = torch.Generator().manual_seed(3)  # the same draws, by hand, without the loop
    sequence = prefix
    for t in range(4):
        expected = head(decoder(sequence)[:, -1:]).sample(1.0, generator=replay)
        torch.testing.assert_close(tokens[:, t : t + 1], expected, atol=1e-5, rtol=1e-5)
        sequence = torch.cat([sequence, embed(expected)], dim=1)


def test_generate_and_sampler_errors_name_what_is_missing():
    decoder, head, embed = perturbed_parts()
    with pytest.raises(TypeError, match="has no new_cache"):
        generate(lambda x: x, torch.randn(1, 2, 8), 3, lambda h: (h, h), use_cache=True)
    with pytest.raises(ValueError, match="needs uncond_prefix"):
        sample_soft_tokens(decoder, head, embed, torch.randn(1, 2, 8), 3, guidance=2.0)
    cache = KVCache(1, 2)
    cache.update(0, torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))
    cache.advance(2)
    with pytest.raises(ValueError, match="KV cache of 2 positions is full"):
        cache.update(0, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))


def test_decode_soft_tokens_draws_the_factored_dims_and_inverts_the_flow():
    torch.manual_seed(0)
    jet = Jet(JetConfig(image_size=(8, 8), channels=1, patch_size=2, depth=2, emb_dim=8,
                        num_heads=1, kinds=("channels", "spatial")))  # fmt: skip
    with torch.no_grad():
        for p in jet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kept = torch.randn(2, 16, 1)
    images = decode_soft_tokens(jet, kept, generator=torch.Generator().manual_seed(5))
    rest = rng.randn((2, 16, 3), generator=torch.Generator().manual_seed(5), like=kept)
    expected = jet.decode(merge_tokens(kept, rest)).clamp(-1, 1)
    torch.testing.assert_close(images, expected)
    assert images.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"kept tokens must be \[B, 16, d <= 4\]"):
        decode_soft_tokens(jet, torch.randn(2, 15, 1))
