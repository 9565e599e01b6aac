"""The in-memory, content-keyed latent store (``metalora_core.data.latent_cache``), with a real
(tiny, random) diffusers VAE as the encoder."""
from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageOps

from metalora_core.data.latent_cache import LatentCache, latent_key
from metalora_core.hosts.diffusers_flux import encode_images
from metalora_core.hosts.tiny import build_tiny_flux_pipeline


def _pics():
    a = Image.effect_mandelbrot((32, 48), (-2, -1, 1, 1), 40).convert("RGB")
    return [a, ImageOps.mirror(a), Image.linear_gradient("L").resize((48, 32)).convert("RGB")]


@pytest.fixture(scope="module")
def vae():
    return build_tiny_flux_pipeline(seed=0).vae


def test_encodes_only_what_is_missing_and_gives_the_encoder_bits(vae):
    calls = []

    def encode(images):
        calls.append(len(images))
        with torch.no_grad():
            return encode_images(vae, images)

    pics = _pics()
    cache = LatentCache(1 << 20)
    first, new = cache.encode(encode, "vae-a", pics[:2])
    assert (calls, new) == ([2], 2)
    again, new = cache.encode(encode, "vae-a", pics)  # two kept, one new (in one call)
    assert (calls, new) == ([2, 1], 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again[:2]))
    with torch.no_grad():
        want = encode_images(vae, pics)
    assert all(torch.equal(w, z) for w, z in zip(want, again))
    assert not torch.equal(again[0], again[1])  # a mirror image has the size but not the pixels: its own key
    _, new = cache.encode(encode, "vae-b", pics[:1])  # another encoder: encoded again
    assert (calls, new) == ([2, 1, 1], 1)


def test_key_is_encoder_and_pixels():
    a, mirrored, _ = _pics()
    assert latent_key("x", a) == latent_key("x", a.copy())
    assert len({latent_key("x", a), latent_key("y", a), latent_key("x", mirrored), latent_key("x", a.convert("L"))}) == 4


def test_least_recently_used_go_first_when_over_the_byte_bound():
    pics = _pics()

    def encode(images):
        return [torch.full((4, 2, 2), float(im.size[0])) for im in images]  # 64 bytes each

    cache = LatentCache(128)  # two latents
    cache.encode(encode, "e", pics[:2])
    cache.encode(encode, "e", pics[:1])  # touch the first: the second is now the oldest
    _, new = cache.encode(encode, "e", pics[2:])
    assert new == 1 and len(cache) == 2 and cache.nbytes == 128
    _, new = cache.encode(encode, "e", pics[:1])
    assert new == 0  # kept
    _, new = cache.encode(encode, "e", pics[1:2])
    assert new == 1  # evicted
    with pytest.raises(ValueError, match="max_bytes must be >= 0, got -1"):
        LatentCache(-1)
    with pytest.raises(RuntimeError, match="returned 0 latents for 1 images"):
        LatentCache(128).encode(lambda ims: [], "e", pics[:1])
