"""Caption handling as users of kohya's sd-scripts expect it: tag shuffling with a kept prefix, templates.

`shuffle_caption` follows sd-scripts `library/train_util.py` (`process_caption`): the caption is split at
the separator (","), each tag stripped, the first `keep_tokens` tags stay in place and the rest are
shuffled, then joined with ", ". Caption files (`name.txt` beside `name.png`) are read by
`data/image_folder.py`. Randomness comes from the caller's `random.Random`, so training stays exact.
"""

from __future__ import annotations

import random
import string

from latentforge.errors import ConfigError


def shuffle_caption(caption: str, rng: random.Random, keep_tokens: int = 0, separator: str = ",") -> str:
    """Tags after the first `keep_tokens` in a random order (sd-scripts' `shuffle_caption`)."""
    tags = [tag.strip() for tag in caption.split(separator)]
    tags = [tag for tag in tags if tag]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(kept + rest)


TEMPLATE_FIELDS = ("token", "class", "caption")


def check_template(template: str, key: str = "task_options.caption_template") -> None:
    """ConfigError unless `template` is a format string over {token}, {class} and {caption} only."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise ConfigError(f"{key} = {template!r}: not a valid template ({error})") from None
    unknown = sorted(fields - set(TEMPLATE_FIELDS))
    if unknown:
        raise ConfigError(
            f"{key} = {template!r}: unknown field {{{unknown[0]}}}; use {{token}}, {{class}} and {{caption}}"
        )


def apply_template(template: str, *, token: str = "", class_word: str = "", caption: str = "") -> str:
    """`"a photo of {token} {class}"` -> `"a photo of sks dog"`; {caption} is the image's own caption."""
    text = template.format(**{"token": token, "class": class_word, "caption": caption})
    return " ".join(text.split())  # an empty field leaves no double space


def process_caption(
    caption: str,
    rng: random.Random,
    *,
    shuffle: bool = False,
    keep_tokens: int = 0,
    template: str | None = None,
    token: str = "",
    class_word: str = "",
) -> str:
    """The caption a training step sees: shuffled (keeping `keep_tokens` tags), then put in the template."""
    if shuffle:
        caption = shuffle_caption(caption, rng, keep_tokens)
    if template is not None:
        caption = apply_template(template, token=token, class_word=class_word, caption=caption)
    return caption
