"""The files that make one of our model directories an mlx-lm and a Hugging Face transformers one too.

Written beside config.json + model.safetensors by every model-directory writer (and by
`hnet-mlx add-mlx-lm DIR` for older directories). Our own loaders never read them.

- config.json gains `model_type`, mlx-lm's `model_file` (a tiny module in the directory that imports
  `hnet_mlx.mlx_lm_model`; it holds no model code), the BOS/EOS/pad ids, and transformers'
  `auto_map` + `architectures`: two tiny modules that import `hnet_core.hf_config` (AutoConfig)
  and `hnet_torch.hf_model` (AutoModelForCausalLM), again without model code.
- tokenizer.json + tokenizer_config.json: the official ByteTokenizer as a `tokenizers` tokenizer.
  Token id == byte value: a BPE model over the 256 GPT-2 byte characters with no merges, after a
  ByteLevel pre-tokenizer without regex or prefix space, so every UTF-8 byte becomes its own id;
  BOS (254) is prepended by the post-processor; 254/255 are special tokens (skipped by
  `decode(skip_special_tokens=True)`), and `split_special_tokens` keeps text such as "þ" (whose
  GPT-2 character names token 254) from being read as a special token.
  The decoder is a ByteLevel decoder wrapped in a one-element Sequence: its lossy UTF-8 decoding
  matches Python's errors="replace" (maximal subparts), and the wrapping makes mlx-lm choose its
  NaiveStreamingDetokenizer, which holds back an unfinished UTF-8 character, instead of its BPE
  detokenizer, which would drop a leading space of the output.
"""

from __future__ import annotations

import json
import os

from .io import CONFIG_NAME, atomic_write_text
from .tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE

MODEL_TYPE = "hnet"
MODEL_FILE = "hnet_mlx_lm.py"
HF_CONFIG_FILE = "configuration_hnet.py"
HF_MODEL_FILE = "modeling_hnet.py"
HF_CONFIG_CLASS = "HNetHFConfig"
HF_MODEL_CLASS = "HNetHFForCausalLM"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Keys written into config.json for mlx-lm; HNetConfig.from_dict drops them again.
# transformers' save_pretrained adds a few more of its own (see HF_WRITTEN_KEYS).
CONFIG_KEYS = ("model_type", "model_file", "bos_token_id", "eos_token_id", "pad_token_id", "auto_map", "architectures")
HF_WRITTEN_KEYS = ("transformers_version", "dtype", "torch_dtype", "tie_word_embeddings", "use_cache",
                   "max_position_embeddings", "output_attentions", "output_hidden_states", "return_dict")
EXTRA_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, MODEL_FILE, HF_CONFIG_FILE, HF_MODEL_FILE)

MODEL_MODULE = '''"""mlx-lm entry point for this H-Net model directory (written by hnet-mlx; no model code here).

    mlx_lm.generate --model THIS_DIR --trust-remote-code --prompt "Hello"
    model, tokenizer = mlx_lm.load("THIS_DIR", trust_remote_code=True)

Needs the hnet-mlx package: pip install "hnet-mlx[mlx]".
"""

try:
    from hnet_mlx.mlx_lm_model import Model, ModelArgs  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(f"this H-Net model needs the hnet-mlx package: pip install 'hnet-mlx[mlx]' ({e})") from None
'''

HF_CONFIG_MODULE = '''"""transformers' AutoConfig entry point for this H-Net model directory (written by hnet-mlx; no code here).

Needs the hnet-mlx package with transformers: pip install "hnet-mlx[transformers]".
"""

try:
    from hnet_core.hf_config import HNetHFConfig  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(f"this H-Net model needs the hnet-mlx package: pip install 'hnet-mlx[transformers]' ({e})") from None
'''

HF_MODEL_MODULE = '''"""transformers' AutoModelForCausalLM entry point for this H-Net model directory (written by hnet-mlx;
no model code here: it runs hnet_torch).

    model = AutoModelForCausalLM.from_pretrained("THIS_DIR", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained("THIS_DIR", trust_remote_code=True)

Needs the hnet-mlx package with torch and transformers: pip install "hnet-mlx[transformers]".
"""

try:
    from hnet_core.hf_config import HNetHFConfig  # noqa: F401
    from hnet_torch.hf_model import HNetHFForCausalLM  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(f"this H-Net model needs the hnet-mlx package: pip install 'hnet-mlx[transformers]' ({e})") from None
'''


def byte_characters() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what a ByteLevel tokenizer uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tokenizer_json() -> dict:
    chars = byte_characters()
    bos, eos = chars[BOS_ID], chars[EOS_ID]

    def special(i: int, content: str) -> dict:
        return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}

    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [special(BOS_ID, bos), special(EOS_ID, eos)],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [BOS_ID], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteLevel", **byte_level}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {chars[i]: i for i in range(VOCAB_SIZE)}, "merges": []},
    }


def tokenizer_config() -> dict:
    chars = byte_characters()
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": chars[BOS_ID],
        "eos_token": chars[EOS_ID],
        "pad_token": chars[EOS_ID],  # batches need one; EOS also ends a document, so padding reads as "no more text"
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "model_max_length": 1 << 30,
    }


def config_keys() -> dict:
    return {"model_type": MODEL_TYPE, "model_file": MODEL_FILE, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
            "pad_token_id": EOS_ID, "architectures": [HF_MODEL_CLASS],
            "auto_map": {"AutoConfig": f"{HF_CONFIG_FILE[:-3]}.{HF_CONFIG_CLASS}",
                         "AutoModelForCausalLM": f"{HF_MODEL_FILE[:-3]}.{HF_MODEL_CLASS}"}}


def write_config(directory: str, config: dict) -> None:
    """config.json = our config + the mlx-lm keys."""
    atomic_write_text(os.path.join(directory, CONFIG_NAME), json.dumps({**config, **config_keys()}, indent=4) + "\n")


def write_tokenizer_and_module(directory: str) -> None:
    atomic_write_text(os.path.join(directory, TOKENIZER_FILE), json.dumps(tokenizer_json(), ensure_ascii=False) + "\n")
    atomic_write_text(os.path.join(directory, TOKENIZER_CONFIG_FILE),
                      json.dumps(tokenizer_config(), ensure_ascii=False, indent=2) + "\n")
    atomic_write_text(os.path.join(directory, MODEL_FILE), MODEL_MODULE)
    atomic_write_text(os.path.join(directory, HF_CONFIG_FILE), HF_CONFIG_MODULE)
    atomic_write_text(os.path.join(directory, HF_MODEL_FILE), HF_MODEL_MODULE)


def write_model_files(directory: str, config: dict) -> None:
    """config.json (with the mlx-lm keys), tokenizer files and the model_file module, into `directory`."""
    write_config(directory, config)
    write_tokenizer_and_module(directory)


# A base model has no chat format; this template passes the messages through as plain text, so
# chat front ends (mlx_lm.chat) continue what the user typed. Opt-in only: with any template in
# tokenizer_config.json, mlx_lm.generate and mlx_lm.evaluate would apply it by default and drop BOS.
PLAIN_CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def add_chat_template(directory: str, template: str = PLAIN_CHAT_TEMPLATE) -> None:
    """Give a model directory's tokenizer a chat template (default: plain continuation)."""
    path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["chat_template"] = template
    atomic_write_text(path, json.dumps(config, ensure_ascii=False, indent=2) + "\n")


def add_to_directory(directory: str) -> list[str]:
    """Make an existing model directory an mlx-lm and transformers one (each file replaced atomically); returns the files written."""
    from .config import HNetConfig
    from .errors import HNetError
    from .io import is_model_dir

    if not os.path.isdir(directory) or not is_model_dir(directory):
        raise HNetError(f"{directory} is not a model directory (expected {CONFIG_NAME} and model.safetensors)")
    config = HNetConfig.from_json(os.path.join(directory, CONFIG_NAME))  # validates before touching anything
    write_model_files(directory, config.to_dict())
    return [CONFIG_NAME, *EXTRA_FILES]
