"""Prompts for tokenizer parity: the kinds of text users type into Stable Diffusion, edge cases included.

`PROMPTS` is hand-written cases plus a deterministic grid of subject x style x weight-syntax prompts.
"""

from __future__ import annotations

import itertools

PLAIN = [
    "a photo of a cat",
    "a painting of a fox sitting in a field at sunrise, trending on artstation",
    "portrait of a woman, highly detailed, digital painting, sharp focus, illustration",
    "an astronaut riding a horse on mars",
    "A Photograph Of An Old Man With A Beard",
    "UPPERCASE PROMPT WITH SHOUTING",
    "mIxEd CaSe WoRdS",
    "cyberpunk city at night, neon lights, rain, reflections",
    "the quick brown fox jumps over the lazy dog",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "a",
    "I",
    "x y z",
    "ab",
    "lowpoly isometric diorama of a tiny island",
    "octane render, unreal engine 5, 8k, hdr",
    "by greg rutkowski and alphonse mucha",
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer",
    "worst quality, low quality, jpeg artifacts, blurry, bad anatomy, extra fingers",
]

PUNCTUATION = [
    "hello, world!",
    "what?! really... yes.",
    "a cat; a dog: a bird",
    "well-known state-of-the-art",
    "under_score snake_case_name",
    "email@example.com and https://example.com/path?query=1&x=2",
    "#hashtag @mention $100 %50 ^caret ~tilde `backtick`",
    "a+b=c, 2*3/4-5",
    "!!!???...,,,;;;",
    "----",
    "...",
    "<>{}[]()",
    "a/b\\c|d",
    "it's a dog's life",
    "don't won't can't shouldn't",
    "I'M HERE, YOU'RE THERE, WE'LL SEE, THEY'VE GONE, HE'D KNOW",
    "'s 't 're 've 'm 'll 'd",
    "rock'n'roll",
    "'quoted' \"double quoted\"",
    "“curly double” ‘curly single’",
    "«guillemets» „German quotes“",
    "em—dash en–dash minus − ellipsis…",
    "a · b • c",
    "© ® ™ ° ± × ÷",
]

HTML = [
    "&amp;",
    "fish &amp; chips",
    "&lt;b&gt;bold&lt;/b&gt;",
    "&amp;amp; double escaped",
    "&amp;lt;tag&amp;gt;",
    "<b>bold</b> &amp; more",
    "<i>real tags</i>",
    "&quot;quoted&quot; &#39;apos&#39;",
    "&#x263A; smiley entity",
    "&nbsp;non breaking&nbsp;",
    "&copy; 2024 &mdash; all rights",
    "AT&T and R&D",
    "&unknownentity; stays",
    "& alone &",
    "a&amp;b<c",
    "<b>&amp;amp;</b> doubly escaped next to a tag",
    "<i> &amp;lt;b&amp;gt;",
]

NUMBERS = [
    "1024x768",
    "3.14159",
    "1,000,000 dollars",
    "the year 1999",
    "4k 8k 16k uhd",
    "0.5 1.5 -2.75 +3",
    "1st 2nd 3rd 4th",
    "v1.5 sd2.1 sdxl1.0",
    "00000",
    "²³¹ superscripts ½ ¼ ¾",
    "①②③ circled",
    "Ⅻ roman numeral",
    "٣٤٥ arabic digits",
    "१२३ devanagari digits",
]

UNICODE = [
    "café naïve résumé façade",
    "Crème brûlée à la carte",
    "Straße Größe Übermensch",
    "İstanbul ıi",
    "ÆØÅ æøå œ",
    "e\u0301 combining acute",
    "ﬁne ﬂow ligatures",
    "ＡＢＣ ｆｕｌｌ ｗｉｄｔｈ １２３",
    "ｶﾀｶﾅ halfwidth katakana",
    "一只可爱的猫",
    "日本語のテキスト、ひらがな、カタカナ。",
    "한국어 프롬프트",
    "中文，标点！",
    "Привет, мир",
    "Γειά σου κόσμε",
    "مرحبا بالعالم",
    "שלום עולם",
    "हिन्दी पाठ",
    "ภาษาไทย",
    "Tiếng Việt có dấu",
    "🐱 cat emoji",
    "🔥🔥🔥",
    "👩‍🚀 astronaut zwj",
    "👍🏽 skin tone",
    "🇯🇵 flag",
    "♥ ♦ ♣ ♠ ★ ☆",
    "→ ← ↑ ↓",
    "∑ ∫ √ ∞ ≈ ≠",
    "zero\u200bwidth space",
    "soft\u00adhyphen",
    "cafÃ© mojibake",
    "Ã¼ber mojibake",
    "\ufeffbom at start",
    "replacement \ufffd char",
    "control\x00char\x07bell",
    "\x1b[31mterminal escape\x1b[0m",
]

WHITESPACE = [
    "",
    " ",
    "   \t\n  ",
    "  leading spaces",
    "trailing spaces   ",
    "\tleading tab",
    "line one\nline two",
    "windows\r\nline endings",
    "many     inner      spaces",
    "tab\tseparated\tvalues",
    "non\u00a0breaking\u00a0space",
    "ideographic\u3000space",
    "em\u2003space",
    "line\u2028separator",
    "\n\n\n",
]

A1111 = [
    "(masterpiece:1.2), (best quality), ((detailed)), [blurry]",
    "a (red:1.5) car and a [blue] house",
    "(((very emphasized)))",
    "[[[de-emphasized]]]",
    "\\(escaped parentheses\\) and \\[brackets\\]",
    "[cat|dog|bird] hybrid",
    "[from:to:0.5] scheduling",
    "[from:to:10]",
    "a cat BREAK a dog BREAK a bird",
    "a cat AND a dog :1.2",
    "<lora:my_lora_v2:0.8> portrait",
    "<hypernet:anime:1.0> style",
    "embedding:easynegative, (worst quality:1.4)",
    "(a, b, c:1.1), d",
    "(masterpiece:1.2),(best quality:1.2),1girl,solo",
    "\\\\ double backslash",
    "score_9, score_8_up, score_7_up",
    "(word:0.9)\n(other word:1.3)",
    "a cat <|endoftext|> a dog",
    "<|startoftext|>prefix",
    "punct!!<|endoftext|>",
    "<start_of_text> open clip specials <end_of_text>",
]

LONG = [
    ", ".join(["masterpiece", "best quality", "ultra detailed", "intricate", "sharp focus"] * 8),
    "a very long prompt " * 30,
    " ".join(f"word{i}" for i in range(120)),
    "(extremely detailed CG unity 8k wallpaper:1.3), " * 10,
    "日本語のテキスト" * 30,
    "🐱" * 100,
    "supercalifragilisticexpialidocious " * 20,
    "a, " * 80,
]

# Known spots where transformers' Rust tokenizer differs from the python CLIPTokenizer SD1 was
# trained with (Rust lower-cases per character, Python applies the final-sigma rule; the python
# tokenizer also maps lower-cased special strings through its BPE cache).
FAST_TOKENIZER_DIVERGENT = [
    "ΣΟΦΟΣ ΛΟΓΟΣ final sigma",
    "ΟΔΟΣ",
    "a cat <|ENDOFTEXT|> a dog",
]

_SUBJECTS = [
    "a cat",
    "an old lighthouse",
    "a knight in armor",
    "a bowl of ramen",
    "a futuristic car",
    "a forest spirit",
    "a robot barista",
    "the eiffel tower",
]
_STYLES = [
    "oil painting",
    "watercolor",
    "35mm photo, f/1.8, bokeh",
    "pixel art",
    "anime style, cel shading",
    "ukiyo-e woodblock print",
    "3d render, octane",
    "charcoal sketch",
    "art nouveau, by alphonse mucha",
    "studio ghibli",
    "vaporwave, 80's",
    "low-key lighting, rembrandt",
]
_WEIGHTS = ["{s}, {t}", "({s}:1.3), {t}", "{s}, [{t}]", "(({s})), {t}:0.8"]

GRID = [
    w.format(s=s, t=t) for (s, t), w in zip(itertools.product(_SUBJECTS, _STYLES), itertools.cycle(_WEIGHTS))
]

PROMPTS: list[str] = PLAIN + PUNCTUATION + HTML + NUMBERS + UNICODE + WHITESPACE + A1111 + LONG + GRID
