"""One layer of a transformers config as a refattn variant, its parameters and its inputs.

:func:`attention_spec` reads a config (a ``transformers`` config object, or the dict of a
``config.json``) and says which registered variant computes that layer's attention, with which
parameters, on which inputs. The mapping is written out per family below; every rule names the HF
code it follows (transformers 5.23):

* ``sliding_window=W`` (Mistral, Mixtral, Phi-3; Qwen2/3, Gemma2/3 and gpt-oss on their
  ``"sliding_attention"`` layers) is ``window=(W - 1, 0)``: HF's ``sliding_window_overlay`` keeps key
  ``j`` for query ``i`` iff ``i - W < j <= i`` -- ``W`` tokens, the query included.
* Gemma's ``query_pre_attn_scalar`` sets ``scale = query_pre_attn_scalar ** -0.5``; Gemma2's
  ``attn_logit_softcapping`` is ``softcap``.
* RoPE: ``rope_parameters`` (v5; v4's ``rope_scaling``/``rope_theta`` are converted by the config
  class) become ``base``/``scaling``/``max_position_embeddings``; Gemma3's are per layer type;
  ``partial_rotary_factor`` becomes ``rotary_dim = int(head_dim * factor)`` (Phi-3, GPT-NeoX);
  GPT-J's ``rotary_dim`` and interleaved pairs are ``style="gptj"``; DeepSeek rotates interleaved
  pairs (V2 always, V3 with ``rope_interleave``).
* gpt-oss's sinks are the module's ``sinks`` parameter (read from the module, not the config).
* DeepSeek-V2/V3 are ``mla`` with the latent RMSNorm, q from the hidden states (q-LoRA when
  ``q_lora_rank`` is set) and YaRN's ``m(factor, mscale_all_dim)²`` in the softmax scale.
* Falcon with ALiBi adds ``slope_h * j`` before the ``1/sqrt(D)`` scaling: ``alibi_slopes`` are the
  paper's slopes divided by ``sqrt(D)``.

Never a guess: a model type without a rule here, a config option the rule does not cover (a layer
type other than full and sliding attention, bidirectional Gemma, biases in DeepSeek's projections,
Falcon's ``alibi`` with rotary, ...) and an unknown config key whose name concerns attention are
errors that name it. ``refattn.hf.FAMILIES`` lists the supported model types.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from ..errors import ParameterError
from ..validate import check_int

#: config keys every PreTrainedConfig carries outside its dataclass fields
_COMMON_EXTRA = {"_name_or_path", "model_type", "output_attentions", "transformers_version"}
#: an unknown key naming one of these is an error (it could change the attention); others are listed
_ATTENTION_WORDS = ("rope", "rotary", "attn", "attention", "window", "scal", "softcap", "sink", "head",
                    "position", "alibi", "causal", "mask", "norm", "theta", "bias", "kv", "query", "key")


@dataclass(frozen=True)
class AttentionSpec:
    """What :func:`attention_spec` found for one layer.

    ``variant`` and ``params`` run the layer through :func:`refattn.pipeline.run`: ``params`` are
    keyword parameters of the variant, ``inputs`` maps each input the caller supplies to its shape,
    ``module_params`` names parameters whose values are the module's weights (``sinks``,
    DeepSeek's norms and projections) with where they come from. ``layer_type`` is HF's
    (``"full_attention"``, ``"sliding_attention"``) or None; ``capture`` says how
    :func:`refattn.hf.check_module` captures the module (``"attention_interface"`` for models on
    transformers' ``ALL_ATTENTION_FUNCTIONS``, else ``"hook:<family>"``). ``notes`` explain each
    derived value; ``warnings`` are peer quirks of this layer (:data:`refattn.hf.QUIRKS`); ``ignored``
    lists unknown config keys left aside (none of them concerns attention).
    """

    model_type: str
    layer_idx: int
    variant: str
    params: dict
    inputs: dict
    module_params: dict = field(default_factory=dict)
    layer_type: Optional[str] = None
    capture: str = "attention_interface"
    notes: tuple = ()
    warnings: tuple = ()
    ignored: tuple = ()
    transformers_version: str = ""

    def describe(self) -> str:
        """A few lines for people: variant, parameters, inputs, notes, warnings."""
        lines = [f"{self.model_type} layer {self.layer_idx}"
                 + (f" ({self.layer_type})" if self.layer_type else "")
                 + f": variant {self.variant!r}, captured via {self.capture}"]
        for n, v in self.params.items():
            lines.append(f"  {n} = {v!r}")
        lines.append("  inputs: " + ", ".join(f"{n} {s}" for n, s in self.inputs.items()))
        if self.module_params:
            lines.append("  from the module: " + ", ".join(f"{n} <- {s}" for n, s in self.module_params.items()))
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# -- reading the config ------------------------------------------------------------------------------
def load_config(config):
    """A transformers config object from an object or a ``config.json`` dict (``model_type`` required)."""
    from . import _require
    transformers = _require()[1]
    if isinstance(config, dict):
        d = dict(config)
        mt = d.pop("model_type", None)
        if not isinstance(mt, str):
            raise ParameterError(f"config: expected a 'model_type' string in the config dict, got {mt!r}")
        if mt not in FAMILY_OF:
            raise ParameterError(f"config['model_type']: {mt!r} is not supported by refattn.hf; supported: "
                                 f"{', '.join(sorted(FAMILY_OF))}")
        for drop in ("transformers_version", "architectures", "_name_or_path"):
            d.pop(drop, None)
        try:
            return transformers.AutoConfig.for_model(mt, **d)
        except Exception as exc:  # noqa: BLE001 -- HF's strict validators raise their own classes
            text = " ".join(str(exc).split())
            raise ParameterError(f"config: transformers {transformers.__version__} refused this {mt} "
                                 f"config: {text}") from None
    if not hasattr(config, "model_type") or not hasattr(config, "to_dict"):
        raise ParameterError(f"config: expected a transformers config or a config.json dict, got "
                             f"{type(config).__name__}")
    if config.model_type not in FAMILY_OF and hasattr(config, "get_text_config"):
        text = config.get_text_config()
        if text is not config and getattr(text, "model_type", None) in FAMILY_OF:
            return text  # e.g. Gemma3's multimodal config: the text model's layers
    return config


def _unknown_keys(config) -> tuple:
    """``(dangerous, ignored)``: keys of ``config`` that its class does not define."""
    fields = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    default = type(config)()
    known = fields | _COMMON_EXTRA | set(default.to_dict())
    values = config.to_dict()
    extra = sorted(k for k in values if k not in known and not k.startswith("_"))
    bad = tuple(k for k in extra if any(w in k.lower() for w in _ATTENTION_WORDS)
                and not _consumed_by_rope(config, k, values[k]))
    return bad, tuple(k for k in extra if k not in bad)


#: legacy top-level spellings that HF's config classes fold into ``rope_parameters``
_ROPE_ALIASES = {"rotary_pct": "partial_rotary_factor", "rotary_emb_base": "rope_theta"}


def _consumed_by_rope(config, key, value) -> bool:
    """True when a top-level key is one HF's config class read into ``rope_parameters`` (Phi-3 keeps
    ``partial_rotary_factor`` as an attribute too) and the dict holds the same value."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict):
        return False
    dicts = [rope] + [d for d in rope.values() if isinstance(d, dict)]
    name = _ROPE_ALIASES.get(key, key)
    return any(name in d and d[name] == value for d in dicts)


def _get(config, name, default=None):
    return getattr(config, name, default)


def _head_dim(config):
    hd = _get(config, "head_dim")
    return int(hd) if hd else int(config.hidden_size // config.num_attention_heads)


def _layer_type(config, layer_idx):
    types = _get(config, "layer_types")
    if not types:
        return None
    t = types[layer_idx]
    if t not in ("full_attention", "sliding_attention"):
        raise ParameterError(f"config.layer_types[{layer_idx}]: {t!r} is not supported by refattn.hf "
                             f"(full_attention and sliding_attention are)")
    return t


def _rope_params(rope, head_dim, mpe, notes, where="rope_parameters"):
    """``base``, ``scaling``, ``rotary_dim``, ``max_position_embeddings`` from HF's rope dict."""
    if not isinstance(rope, dict):
        raise ParameterError(f"config.{where}: expected a dict with rope_theta, got {rope!r}")
    d = dict(rope)
    prf = d.pop("partial_rotary_factor", 1.0)
    out = {"base": float(d.pop("rope_theta"))}
    rtype = d.get("rope_type", d.get("type", "default"))
    if prf != 1.0:
        out["rotary_dim"] = int(head_dim * prf)
        notes.append(f"rotary_dim = int(head_dim {head_dim} * partial_rotary_factor {prf}) = {out['rotary_dim']}")
    if rtype != "default":
        out["scaling"] = d
        notes.append(f"RoPE scaling {rtype!r} from config.{where}")
    out["max_position_embeddings"] = int(mpe)
    from ..position import rope_frequencies
    try:  # an option refattn's RoPE does not know is an error here, naming the config key
        rope_frequencies(out.get("rotary_dim", head_dim), base=out["base"], scaling=out.get("scaling"),
                         max_position_embeddings=out["max_position_embeddings"])
    except ParameterError as exc:
        msg = str(exc)
        if msg.startswith("scaling"):
            raise ParameterError(f"config.{where}{msg[len('scaling'):]}") from None
        raise
    return out


def _window(config, layer_type, notes, applies):
    w = _get(config, "sliding_window")
    if not applies or w is None:
        return {}
    w = check_int(w, "config.sliding_window", 1)
    notes.append(f"sliding_window={w} -> window=({w - 1}, 0) (W tokens including the query)")
    return {"window": (w - 1, 0)}


def _qkv_inputs(config, head_dim, v_dim=None):
    hq, hkv = int(config.num_attention_heads), int(_get(config, "num_key_value_heads") or config.num_attention_heads)
    if hkv < 1 or hq % hkv:
        raise ParameterError(f"config.num_key_value_heads: expected a divisor of num_attention_heads ({hq}), "
                             f"got {hkv}")
    return {"q": f"(B, {hq}, S, {head_dim})", "k": f"(B, {hkv}, S, {head_dim})",
            "v": f"(B, {hkv}, S, {v_dim or head_dim})"}


# -- the families ---------------------------------------------------------------------------------------
def _rope_family(config, layer_idx, model_type):
    """Llama-style decoders on the attention interface: causal RoPE (neox pairs) plus options."""
    notes, warnings = [], []
    hd = _head_dim(config)
    layer_type = _layer_type(config, layer_idx)
    params = {"causal": True}
    if _get(config, "use_bidirectional_attention"):
        raise ParameterError("config.use_bidirectional_attention: True is not supported by refattn.hf "
                             "(bidirectional Gemma windows are built by the model, not the attention)")
    if model_type in ("gemma2", "gemma3_text"):
        qs = _get(config, "query_pre_attn_scalar")
        params["scale"] = float(qs) ** -0.5
        notes.append(f"scale = query_pre_attn_scalar ** -0.5 = {qs} ** -0.5")
    else:
        params["scale"] = hd ** -0.5
    # sliding windows: per layer type, or for every layer (Mistral, Mixtral, Phi-3)
    if layer_type is not None:
        params.update(_window(config, layer_type, notes, layer_type == "sliding_attention"))
    elif model_type in ("mistral", "mixtral", "phi3"):
        params.update(_window(config, None, notes, True))
    softcap = _get(config, "attn_logit_softcapping")
    if softcap is not None and model_type == "gemma2":
        params["softcap"] = float(softcap)
        notes.append(f"softcap = attn_logit_softcapping = {softcap}")
    elif softcap is not None:
        warnings.append(quirk("gemma3_softcap", value=softcap))
    rope = config.rope_parameters
    if model_type == "gemma3_text":
        rope = rope[layer_type]
        where = f"rope_parameters[{layer_type!r}]"
    else:
        where = "rope_parameters"
    params.update(_rope_params(rope, hd, config.max_position_embeddings, notes, where))
    params["style"] = "neox"
    module_params = {}
    if model_type == "gpt_oss":
        module_params["sinks"] = "module.sinks (Hq,): one sink logit per head"
    return dict(variant="rope", params=params, inputs=_qkv_inputs(config, hd), module_params=module_params,
                layer_type=layer_type, notes=notes, warnings=warnings)


def _neox(config, layer_idx, model_type):
    notes = []
    hd = int(config.hidden_size // config.num_attention_heads)
    params = {"causal": True, "scale": hd ** -0.5}
    params.update(_rope_params(config.rope_parameters, hd, config.max_position_embeddings, notes))
    params["style"] = "neox"
    return dict(variant="rope", params=params, inputs=_qkv_inputs(config, hd), notes=notes)


def _deepseek(config, layer_idx, model_type):
    notes, warnings = [], []
    if _get(config, "attention_bias"):
        raise ParameterError(f"config.attention_bias: True is not supported for {model_type} (refattn's mla "
                             f"has no projection biases)")
    h = int(config.num_attention_heads)
    if int(_get(config, "num_key_value_heads") or h) != h:
        raise ParameterError(f"config.num_key_value_heads: expected {h} (= num_attention_heads; MLA expands "
                             f"per-head keys), got {config.num_key_value_heads}")
    dn, dr, dv = int(config.qk_nope_head_dim), int(config.qk_rope_head_dim), int(config.v_head_dim)
    dc, dq = int(config.kv_lora_rank), _get(config, "q_lora_rank")
    params = {"causal": True, "q_input": "hidden", "norm_eps": 1e-6}
    if model_type == "deepseek_v2":
        params["style"] = "gptj"
        notes.append("DeepSeek-V2 rotates interleaved pairs (complex view of (2i, 2i+1)): style='gptj'")
    else:
        params["style"] = "gptj" if _get(config, "rope_interleave") else "neox"
        notes.append(f"rope_interleave={_get(config, 'rope_interleave')} -> style={params['style']!r}")
    rope = _rope_params(config.rope_parameters, dr, config.max_position_embeddings, notes)
    if "rotary_dim" in rope:
        raise ParameterError("config.rope_parameters['partial_rotary_factor']: not supported for MLA "
                             "(the whole qk_rope_head_dim is rotated)")
    params.update(rope)
    scaling = rope.get("scaling") or {}
    if scaling.get("mscale_all_dim"):
        if scaling.get("factor") is None:
            raise ParameterError("config.rope_parameters['factor']: DeepSeek's softmax mscale needs it "
                                 "(HF's yarn_apply_mscale reads rope_parameters['factor']), got none")
        notes.append(f"softmax scale = (d_nope + d_rope) ** -0.5 * m(factor, mscale_all_dim)**2 with "
                     f"m(f, a) = 0.1 a ln f + 1 (VARIANTS C), the mla default")
    eps = _get(config, "rms_norm_eps")
    if eps is not None and eps != 1e-6:
        warnings.append(quirk("deepseek_latent_eps", value=eps))
    module_params = {"kv_norm": "kv_a_layernorm.weight (d_c,)"}
    if dq is None:
        module_params["w_q"] = "q_proj.weight.T as (d_model, H, d_nope + d_rope)"
    else:
        module_params.update(w_dq="q_a_proj.weight.T (d_model, d_q)", q_norm="q_a_layernorm.weight (d_q,)",
                             w_uq="q_b_proj.weight.T as (d_q, H, d_nope + d_rope)")
        notes.append(f"q-LoRA of rank {dq}: q = RMSNorm(h W_DQ) W_UQ")
    dm = int(config.hidden_size)
    inputs = {"q": f"(B, S, {dm}) hidden states of the queries", "hidden": f"(B, S, {dm})",
              "w_dkv": f"({dm}, {dc}) = kv_a_proj_with_mqa.weight.T[:, :d_c]",
              "w_uk": f"({h}, {dc}, {dn}) from kv_b_proj", "w_uv": f"({h}, {dc}, {dv}) from kv_b_proj",
              "w_kr": f"({dm}, {dr}) = kv_a_proj_with_mqa.weight.T[:, d_c:]"}
    return dict(variant="mla", params=params, inputs=inputs, module_params=module_params, notes=notes,
                warnings=warnings)


def _t5(config, layer_idx, model_type):
    """T5's self-attention of the stack ``config.is_decoder`` selects (encoder: bidirectional buckets,
    no causal mask; decoder: unidirectional buckets, causal), scale 1, the relative-position table
    from the module (``relative_attention_bias.weight``; HF shares layer 0's with every layer)."""
    h, dkv = int(config.num_heads), int(config.d_kv)
    dec = bool(config.is_decoder)
    if dec and layer_idx >= int(config.num_decoder_layers):
        raise ParameterError(f"layer_idx: expected a decoder layer in [0, {config.num_decoder_layers - 1}], "
                             f"got {layer_idx}")
    params = {"causal": dec, "scale": 1.0, "bidirectional": not dec,
              "num_buckets": int(config.relative_attention_num_buckets),
              "max_distance": int(config.relative_attention_max_distance)}
    notes = [f"config.is_decoder={dec}: the {'decoder' if dec else 'encoder'} self-attention "
             f"({'causal, unidirectional' if dec else 'bidirectional'} buckets); scale 1 (T5 has no 1/sqrt(d))"]
    inputs = {"q": f"(B, {h}, S, {dkv})", "k": f"(B, {h}, S, {dkv})", "v": f"(B, {h}, S, {dkv})",
              "table": f"({params['num_buckets']}, {h}) = relative_attention_bias.weight (layer 0's)"}
    return dict(variant="t5", params=params, inputs=inputs, notes=notes)


#: family name -> (model types, spec builder, capture)
FAMILIES = {
    "llama": (("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt_oss", "phi3"),
              _rope_family, "attention_interface"),
    "gpt_neox": (("gpt_neox",), _neox, "attention_interface"),
    "deepseek": (("deepseek_v2", "deepseek_v3"), _deepseek, "attention_interface"),
    "t5": (("t5",), _t5, "attention_interface"),
}
FAMILY_OF = {mt: name for name, (types, _, _) in FAMILIES.items() for mt in types}


def register_family(name, model_types, builder, capture):
    """Add a family (the per-model hook modules of :mod:`refattn.hf.hooks` call this)."""
    FAMILIES[name] = (tuple(model_types), builder, capture)
    for mt in model_types:
        FAMILY_OF[mt] = name


def attention_spec(config, layer_idx=0) -> AttentionSpec:
    """The variant, parameters and inputs of layer ``layer_idx`` of ``config`` (module docstring).

    ``config``: a transformers config object or a ``config.json`` dict (with ``model_type``).
    ``layer_idx``: an integer (numpy integers too) in ``[0, num_hidden_layers)``. Errors name the
    unsupported model type, config option or key.
    """
    from . import _require, hooks  # noqa: F401  (hooks register the per-model families)
    transformers = _require()[1]
    cfg = load_config(config)
    mt = cfg.model_type
    if mt not in FAMILY_OF:
        raise ParameterError(f"config.model_type: {mt!r} is not supported by refattn.hf; supported: "
                             f"{', '.join(sorted(FAMILY_OF))}")
    n_layers = _get(cfg, "num_hidden_layers", _get(cfg, "num_layers"))
    idx = check_int(layer_idx, "layer_idx", 0, None if n_layers is None else int(n_layers) - 1,
                    what=None if n_layers is None else
                    f"a layer index in [0, {int(n_layers) - 1}] ({mt} config with {n_layers} layers)")
    bad, ignored = _unknown_keys(cfg)
    if bad:
        raise ParameterError(f"config[{bad[0]!r}]: not a field of {type(cfg).__name__} (transformers "
                             f"{transformers.__version__}) and its name concerns attention; refattn.hf "
                             f"does not guess what it means (a typo of a real option?)")
    family = FAMILY_OF[mt]
    _, builder, capture = FAMILIES[family]
    parts = builder(cfg, idx, mt)
    return AttentionSpec(model_type=mt, layer_idx=idx, variant=parts["variant"], params=parts["params"],
                         inputs=parts["inputs"], module_params=parts.get("module_params", {}),
                         layer_type=parts.get("layer_type"), capture=capture,
                         notes=tuple(parts.get("notes", ())), warnings=tuple(parts.get("warnings", ())),
                         ignored=ignored, transformers_version=transformers.__version__)


def quirk(key, **values) -> str:
    """The warning text of quirk ``key`` of :data:`refattn.hf.quirks.QUIRKS`, with its values."""
    from .quirks import QUIRKS
    q = QUIRKS[key]
    return (f"{q['model'].format(**values)}: {q['what'].format(**values)} (seen in transformers "
            f"{q['seen_in']})")


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
