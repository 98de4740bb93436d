"""The top-level API: lazy exports, txt2img/img2img return images carrying their infotext."""

import numpy as np

import latentforge
from latentforge.model import StableDiffusion
from latentforge.models.families import TINY
from latentforge.pipelines.infotext import PNG_KEY, parse_infotext


def test_lazy_exports_resolve():
    for name in latentforge.__all__:
        assert getattr(latentforge, name) is not None


def test_txt2img_and_img2img():
    model = StableDiffusion.from_family(TINY).eval()
    images = latentforge.txt2img(model, "a cat", steps=2, seed=5, width=32, height=32, batch_size=2)
    assert [im.size for im in images] == [(32, 32), (32, 32)]
    prompt, _, params = parse_infotext(images[1].info[PNG_KEY])
    assert prompt == "a cat" and params["Seed"] == "6" and params["Steps"] == "2"
    again = latentforge.img2img(model, images[0], "a dog", steps=4, seed=1, denoising_strength=0.5)
    assert again[0].size == (32, 32)  # img2img keeps the init image's size unless given one
    assert parse_infotext(again[0].info[PNG_KEY])[2]["Denoising strength"] == "0.5"


def test_txt2img_with_a_list_of_prompts_gives_one_image_each():
    model = StableDiffusion.from_family(TINY).eval()
    options = dict(steps=2, seed=5, width=32, height=32, batch_size=2)
    images = latentforge.txt2img(model, ["a cat", "a dog", "a cow"], **options)
    infos = [parse_infotext(im.info[PNG_KEY]) for im in images]
    assert [(p, params["Seed"]) for p, _, params in infos] == [("a cat", "5"), ("a dog", "6"), ("a cow", "7")]
    alone = latentforge.txt2img(model, "a dog", **{**options, "seed": 6, "batch_size": 1})[0]
    assert np.abs(np.asarray(alone, dtype=np.int16) - np.asarray(images[1], dtype=np.int16)).max() <= 1
