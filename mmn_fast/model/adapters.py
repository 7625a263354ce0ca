"""Model adapters: where the decoder's MLPs, unembedding and final norm live in a VLM.

An adapter is a small declarative `ModelSpec` of dotted module paths, registered by
architecture name (`config.architectures[0]` / the model class name). Models that are not
registered go through `discover_spec`, which finds LLaMA-style (gate/up/down) or GPT-style
(fc1/fc2, c_fc/c_proj) MLPs by module pattern. Any field can be overridden by the user.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import MMNError
from .moe import DENSE, ExpertBlock, ExpertSlot, expert_block, is_moe


@dataclass(frozen=True)
class ModelSpec:
    """Dotted module paths. `mlp` is relative to a decoder layer, `out_proj`/`act_fn` to the MLP."""

    layers: str  # nn.ModuleList of decoder layers
    mlp: str = "mlp"  # "" when the projections sit on the layer itself (OPT)
    out_proj: str = "down_proj"  # its input is h, the activation that is scored
    act_fn: str | None = "act_fn"  # its output alone: the paper's released-code activation
    unembed: str = "lm_head"
    final_norm: str | None = None
    gated: bool = True  # h = act(gate) * up; False: h = act(fc1)
    # How the prompt is written when the processor has no chat template. "{image}" is replaced
    # by the image placeholder (or nothing, when the processor inserts image tokens itself).
    prompt_template: str = "{image}\n{prompt}"


ADAPTERS: dict[str, ModelSpec] = {}


def register_adapter(architecture: str, spec: ModelSpec) -> None:
    """Register `spec` for models whose class (or `config.architectures[0]`) is `architecture`."""
    ADAPTERS[architecture] = spec


register_adapter(
    "LlavaForConditionalGeneration",
    ModelSpec(layers="model.language_model.layers", final_norm="model.language_model.norm",
              prompt_template="USER: {image}\n{prompt} ASSISTANT:"),
)
register_adapter(
    "InstructBlipForConditionalGeneration",
    # The processor inserts the 32 query tokens itself; the prompt is plain text.
    # Its language model is a full *ForCausalLM (Vicuna/LLaMA in the released checkpoints).
    ModelSpec(layers="language_model.model.layers", final_norm="language_model.model.norm",
              unembed="language_model.lm_head", prompt_template="{prompt}"),
)

register_adapter(
    "Blip2ForConditionalGeneration",
    # OPT decoder (the released checkpoints; flan-T5 ones are encoder-decoder and refused): fc1/fc2 on the
    # decoder layer itself, positions flattened to [B*T, d] inside it. The processor inserts the query tokens.
    ModelSpec(layers="language_model.model.decoder.layers", mlp="", out_proj="fc2", act_fn="activation_fn",
              unembed="language_model.lm_head", final_norm="language_model.model.decoder.final_layer_norm",
              gated=False, prompt_template="{prompt}"),
)

# The 2026 families (tested end to end in tests/test_zoo.py): the text decoder under model.language_model
# (model.text_model for Idefics3 / SmolVLM), LLaMA-style gate/up/down MLPs unless said otherwise.
_LANGUAGE_MODEL = dict(layers="model.language_model.layers", final_norm="model.language_model.norm")
_TEXT_MODEL = dict(layers="model.text_model.layers", final_norm="model.text_model.norm")
for _arch, _paths in {
    "LlavaNextForConditionalGeneration": _LANGUAGE_MODEL, "LlavaOnevisionForConditionalGeneration": _LANGUAGE_MODEL,
    "Qwen2VLForConditionalGeneration": _LANGUAGE_MODEL, "Qwen2_5_VLForConditionalGeneration": _LANGUAGE_MODEL,
    "Qwen3VLForConditionalGeneration": _LANGUAGE_MODEL,
    "Qwen3VLMoeForConditionalGeneration": dict(_LANGUAGE_MODEL, act_fn=None),  # every layer a mixture of experts
    "Glm4vForConditionalGeneration": dict(_LANGUAGE_MODEL, act_fn="activation_fn"),  # fused gate_up_proj
    "Gemma3ForConditionalGeneration": _LANGUAGE_MODEL, "PaliGemmaForConditionalGeneration": _LANGUAGE_MODEL,
    "MllamaForConditionalGeneration": _LANGUAGE_MODEL,  # cross-attention layers read the image
    "InternVLForConditionalGeneration": _LANGUAGE_MODEL, "AyaVisionForConditionalGeneration": _LANGUAGE_MODEL,
    "Mistral3ForConditionalGeneration": _LANGUAGE_MODEL,
    "Idefics3ForConditionalGeneration": _TEXT_MODEL, "SmolVLMForConditionalGeneration": _TEXT_MODEL,
}.items():
    register_adapter(_arch, ModelSpec(**_paths))

_GATED = (("gate_proj", "up_proj", "down_proj", "act_fn"), ("w1", "w3", "w2", "act_fn"))
_PLAIN = (("fc1", "fc2", ("activation_fn", "act_fn", "act")), ("c_fc", "c_proj", ("act",)),
          ("dense_h_to_4h", "dense_4h_to_h", ("activation_func", "act")))
_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "norm_f", "final_norm", "final_layer_norm")
_VISION_WORDS = ("vision", "visual", "vit", "qformer", "abstractor", "image", "projector")


def get_module(model: nn.Module, path: str) -> nn.Module:
    """`model.get_submodule(path)` ("" is the model itself) with an actionable error."""
    try:
        return model.get_submodule(path)
    except AttributeError as e:
        raise MMNError(f"module path '{path}' not found in {type(model).__name__} ({e})") from None


def _mlp_style(mlp: nn.Module) -> tuple[str, str | None, bool] | None:
    """(out_proj, act_fn, gated) if `mlp` looks like a transformer MLP, else None."""
    children = dict(mlp.named_children())
    if "gate_up_proj" in children and "down_proj" in children:  # gate and up fused in one matmul (GLM-4V, Phi-4)
        return "down_proj", next((a for a in ("activation_fn", "act_fn") if a in children), None), True
    for gate, up, down, act in _GATED:
        if gate in children and up in children and down in children:
            return down, act if act in children else None, True
    for fc_in, fc_out, acts in _PLAIN:
        if fc_in in children and fc_out in children:
            act = next((a for a in acts if a in children), None)
            return fc_out, act, False
    return None


_EXPERT_LISTS = ("experts", "shared_experts", "local_experts")  # lists of expert MLPs, never decoder layers


def moe_message(model: nn.Module, where: list, block: str) -> str:
    return (f"layer(s) {where[:4]} of {type(model).__name__} are mixture-of-experts blocks ({block}): they have no "
            "single output projection; this operation handles dense layers only (find scores expert neurons)")


def _out_features(module: nn.Module) -> int | None:
    w = getattr(module, "weight", None)
    if w is None or w.ndim != 2:
        return None
    # transformers' GPT-2 Conv1D stores [in, out]; nn.Linear stores [out, in].
    return w.shape[1] if type(module).__name__ == "Conv1D" else w.shape[0]


def discover_spec(model: nn.Module) -> ModelSpec:
    """Find the text decoder's layer list, MLP, unembedding and final norm by module pattern."""
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if unembed is None:
        raise MMNError(
            f"{type(model).__name__} has no output embeddings (lm_head): mmn_fast needs a causal "
            "LM head. Pass unembed='<path>' to mmn_fast.load()."
        )
    unembed_path = next(n for n, m in model.named_modules() if m is unembed)
    d_model = unembed.weight.shape[1]
    candidates = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or name.rsplit(".", 1)[-1] in _EXPERT_LISTS:
            continue
        for mlp_name, mlp in mod[0].named_modules():  # "" first: MLP weights on the layer itself (OPT)
            if is_moe(mlp):  # every layer a mixture of experts (Qwen3-VL-MoE): dense layers, if any, use down_proj
                expert_block(mlp, d_model)  # refuses expert layouts it cannot read
                visionish = any(w in name.lower() for w in _VISION_WORDS)
                candidates.append((visionish, -len(mod), name, mlp_name, "down_proj", None, True))
                break
            style = _mlp_style(mlp)
            if style is None:
                continue
            out_proj, act, gated = style
            if _out_features(getattr(mlp, out_proj)) != d_model:
                continue
            visionish = any(w in name.lower() for w in _VISION_WORDS)
            candidates.append((visionish, -len(mod), name, mlp_name, out_proj, act, gated))
            break
    if not candidates:
        moe = [n for n, m in model.named_modules() if is_moe(m)]
        if moe:
            raise MMNError(moe_message(model, moe[:1], type(model.get_submodule(moe[0])).__name__))
        raise MMNError(
            f"could not find the decoder MLPs of {type(model).__name__}: no nn.ModuleList of layers "
            "with gate_proj/up_proj/down_proj, fc1/fc2 or c_fc/c_proj projecting to the LM's hidden "
            f"size {d_model}. Pass the module paths to mmn_fast.load(..., layers='model.layers', "
            "mlp='mlp', out_proj='down_proj', act_fn='act_fn', final_norm='model.norm')."
        )
    _, _, layers, mlp_name, out_proj, act, gated = min(candidates)
    parent = model.get_submodule(layers.rsplit(".", 1)[0]) if "." in layers else model
    norm = next((n for n in _NORM_NAMES if n in dict(parent.named_children())), None)
    final_norm = (f"{layers.rsplit('.', 1)[0]}.{norm}" if "." in layers else norm) if norm else None
    return ModelSpec(layers=layers, mlp=mlp_name, out_proj=out_proj, act_fn=act, unembed=unembed_path,
                     final_norm=final_norm, gated=gated)


def spec_for(model: nn.Module, overrides: dict | None = None) -> ModelSpec:
    """The registered spec for this architecture (else discovered), with user overrides applied."""
    arch = type(model).__name__
    archs = getattr(getattr(model, "config", None), "architectures", None) or []
    spec = ADAPTERS.get(arch) or next((ADAPTERS[a] for a in archs if a in ADAPTERS), None)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if spec is None:
        if "layers" in overrides:
            spec = ModelSpec(layers=overrides["layers"])
        else:
            spec = discover_spec(model)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelSpec)}
    if unknown:
        raise MMNError(f"unknown adapter override(s) {sorted(unknown)}; valid: "
                       f"{[f.name for f in dataclasses.fields(ModelSpec)]}")
    return dataclasses.replace(spec, **overrides)


ACTIVATIONS = ("down_proj_input", "act_fn")


def check_activation(activation: str) -> None:
    """Raise MMNError unless `activation` names a scored activation."""
    if activation not in ACTIVATIONS:
        raise MMNError(f"unknown activation '{activation}': use 'down_proj_input' or 'act_fn'")


class _Handles:
    """Several hook handles removed as one."""

    def __init__(self, *handles: RemovableHandle):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass(frozen=True)
class HookSite:
    """Where a tensor of the forward pass can be read: the first input of `module` (pre=True, a
    forward pre-hook) or its output (pre=False, a forward hook). Every capture goes through one,
    so the activation mode is resolved in one place (`Adapter.hook_site`).

    layer: the decoder layer around the site. Models that flatten positions inside a layer (OPT
    reshapes [B, T, d] to [B*T, d] before fc1/fc2) then still hand hooks [B, T, F]: the layer's input
    shape is read by a pre-hook, and what a hook returns goes back in the model's own shape."""

    module: nn.Module
    pre: bool
    layer: nn.Module | None = None

    def register(self, fn: Callable, output: bool = False) -> RemovableHandle | _Handles:
        """Call fn(x) at each forward through the site, x the site's tensor (an MLP activation h is
        [batch, pos, d_mlp]); a tensor fn returns replaces x downstream. output=True: fn(x, y) with y
        what `module` returns; a tensor fn returns replaces y. The caller removes the handle."""
        if self.layer is not None:
            return self._register_unflattened(fn, output)
        if output:
            if self.pre:
                return self.module.register_forward_hook(lambda _m, args, y: fn(args[0], y))
            return self.module.register_forward_hook(lambda _m, _args, y: fn(y, y))
        if self.pre:
            def pre_hook(_m, args):
                x = fn(args[0])
                return None if x is None else (x, *args[1:])

            return self.module.register_forward_pre_hook(pre_hook)
        return self.module.register_forward_hook(lambda _m, _args, y: fn(y))

    def _register_unflattened(self, fn: Callable, output: bool) -> _Handles:
        shape: list = []  # [(B, T)] of the layer's current call

        def record(_m, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            shape[:] = [tuple(x.shape[:2])] if isinstance(x, torch.Tensor) and x.dim() == 3 else []

        def view(t):
            if isinstance(t, torch.Tensor) and t.dim() == 2 and shape and shape[0][0] * shape[0][1] == t.shape[0]:
                return t.view(*shape[0], t.shape[-1])
            return t

        def back(new, like):
            return new.reshape(like.shape) if isinstance(new, torch.Tensor) and new.shape != like.shape else new

        site = HookSite(self.module, self.pre)
        if output:
            handle = site.register(lambda x, y: back(fn(view(x), view(y)), y), output=True)
        else:
            handle = site.register(lambda x: back(fn(view(x)), x))
        return _Handles(self.layer.register_forward_pre_hook(record, with_kwargs=True), handle)

    @contextlib.contextmanager
    def hooked(self, fn: Callable, output: bool = False) -> Iterator[None]:
        """`register` for the `with` block only: the hook is removed on exit, also on error."""
        handle = self.register(fn, output)
        try:
            yield
        finally:
            handle.remove()


def output_matrix(out_proj: nn.Module) -> torch.Tensor:
    """An output projection's weight as [d_model, F] (a view: GPT-2's Conv1D stores [F, d])."""
    w = out_proj.weight
    return w.t() if type(out_proj).__name__ == "Conv1D" else w


def unit_matrix(module: nn.Module, slot: ExpertSlot | None) -> torch.Tensor:
    """The [d_model, F] output vectors of `Adapter.unit`'s (module, slot): the module's weight (GPT-2's
    Conv1D transposed), or an expert's slot of a fused experts module's down_proj."""
    return output_matrix(module) if slot is None else slot.matrix(module)


class Adapter:
    """A `ModelSpec` bound to a loaded model: modules and weights ready to use."""

    def __init__(self, model: nn.Module, spec: ModelSpec):
        self.model, self.spec = model, spec
        layer_list = get_module(model, spec.layers)
        if not isinstance(layer_list, (nn.ModuleList, nn.Sequential)) or len(layer_list) == 0:
            raise MMNError(f"'{spec.layers}' in {type(model).__name__} is not a non-empty list of layers")
        self.layer_modules = list(layer_list)
        self.mlps = [get_module(layer, spec.mlp) for layer in layer_list]
        d_model = get_module(model, spec.unembed).weight.shape[1]
        # per layer: the MoE block's experts (None for a dense MLP), and the output projection (None for MoE)
        self.experts: list[ExpertBlock | None] = [expert_block(m, d_model) if is_moe(m) else None for m in self.mlps]
        self.is_moe = any(b is not None for b in self.experts)
        self.out_projs = [None if b is not None else get_module(m, spec.out_proj) for m, b in zip(self.mlps, self.experts)]
        self.act_fns = None
        if spec.act_fn and all(hasattr(m, spec.act_fn) for m in self.mlps):
            acts = [getattr(m, spec.act_fn) for m in self.mlps]
            # A shared module would record every layer's call into each hook: unusable.
            if all(isinstance(a, nn.Module) for a in acts) and len({id(a) for a in acts}) == len(acts):
                self.act_fns = acts
        self.unembed = get_module(model, spec.unembed)
        self.final_norm = get_module(model, spec.final_norm) if spec.final_norm else None
        self.n_layers = len(self.mlps)
        dense = [l for l, b in enumerate(self.experts) if b is None]
        self.d_mlp = self.out_weight(dense[0]).shape[1] if dense else self.experts[0].d_expert
        cfg = getattr(model, "config", None)
        # The text decoder reads the image through cross-attention layers (Mllama), not image tokens
        # in its sequence: there are no image positions to average over.
        self.cross_attention = bool(getattr(getattr(cfg, "text_config", cfg), "cross_attention_layers", None))
        self.image_token_id = next(
            (getattr(cfg, a) for a in ("image_token_id", "image_token_index") if getattr(cfg, a, None) is not None),
            None,
        )

    def out_weight(self, layer: int) -> torch.Tensor:
        """W_out of `layer` as [d_model, F] (column i is neuron i's output vector)."""
        if self.out_projs[layer] is None:
            raise MMNError(moe_message(self.model, [layer], type(self.mlps[layer]).__name__))
        return output_matrix(self.out_projs[layer])

    def unit(self, layer: int, expert: int = DENSE) -> tuple[nn.Module, ExpertSlot | None]:
        """Where the output vectors of the neurons (layer, expert, *) live: (module, slot). A dense layer's
        output projection (expert -1), a routed expert e's fused experts module (its slot of down_proj)
        or the shared expert's down projection (expert E); see `unit_matrix`."""
        if not 0 <= layer < self.n_layers:
            raise MMNError(f"layer {layer} out of range: the model has {self.n_layers} decoder layers")
        block = self.experts[layer]
        if expert == DENSE:
            if block is not None:
                raise MMNError(f"layer {layer} is a mixture-of-experts block: name its neurons as [layer, expert, "
                               f"index] (experts 0..{block.n_experts - 1}"
                               + (f", shared expert {block.n_experts})" if block.shared is not None else ")"))
            return self.out_projs[layer], None
        if block is None:
            raise MMNError(f"layer {layer} is a dense MLP: its neurons have expert -1, not {expert}")
        if 0 <= expert < block.n_experts:
            return block.experts, block.slot(expert)
        if expert == block.n_experts and block.shared is not None:
            return block.shared.down_proj, None
        raise MMNError(f"layer {layer} has experts 0..{block.n_experts - 1}"
                       + (f" and shared expert {block.n_experts}" if block.shared is not None else "")
                       + f", not {expert}")

    def unit_weight(self, layer: int, expert: int = DENSE) -> torch.Tensor:
        """The output vectors [d_model, F] of the neurons (layer, expert, *) (a view: writes reach the model)."""
        return unit_matrix(*self.unit(layer, expert))

    def units(self) -> list[tuple[int, int]]:
        """Every (layer, expert) holding neurons: (l, -1) for dense layers, (l, e) for routed and shared experts."""
        out = []
        for l, block in enumerate(self.experts):
            if block is None:
                out.append((l, DENSE))
            else:
                out += [(l, e) for e in range(block.n_experts + (block.shared is not None))]
        return out

    @property
    def n_neurons(self) -> int:
        """Every neuron a concept is scored over: n_layers x d_mlp for dense models; with mixture-of-experts
        layers every routed and shared expert's neurons too (an expert not chosen at a position scores 0)."""
        return sum(int(self.unit_weight(l, e).shape[1]) for l, e in self.units())

    def scored_weights(self) -> list[torch.Tensor]:
        """Every output-vector matrix (dense W_out, expert and shared-expert down projections) and W_U:
        what a find result depends on (the engine's fingerprint)."""
        ws = []
        for l, block in enumerate(self.experts):
            if block is None:
                ws.append(self.out_weight(l))
            else:
                ws += [block.experts.down_proj] + ([block.shared_out()] if block.shared is not None else [])
        return ws + [self.unembed_weight()]

    def require_dense(self, what: str) -> None:
        """MMNError when the model has MoE layers and `what` does not handle expert neurons yet."""
        if self.is_moe:
            moe = [l for l, b in enumerate(self.experts) if b is not None]
            raise MMNError(f"{type(self.model).__name__} has mixture-of-experts layers ({moe[:4]}): {what} does not "
                           "handle expert neurons yet; engine.find and heatmaps score them")

    def unembed_weight(self) -> torch.Tensor:
        """W_U as [V, d_model]."""
        return self.unembed.weight

    def hook_site(self, layer: int, activation: str = "down_proj_input") -> HookSite:
        """Where `layer`'s scored activation [batch, pos, d_mlp] passes: the output projection's input h
        ("down_proj_input", exact) or the activation module's output ("act_fn", the paper's released code)."""
        check_activation(activation)
        if activation == "down_proj_input":
            if self.out_projs[layer] is None:
                raise MMNError(moe_message(self.model, [layer], type(self.mlps[layer]).__name__))
            return HookSite(self.out_projs[layer], pre=True, layer=self.layer_modules[layer])
        if self.act_fns is None:
            raise MMNError(
                f"activation='act_fn' needs a per-layer activation module '{self.spec.act_fn}' "
                "in each MLP; none was found. Use activation='down_proj_input' or pass act_fn='<name>'."
            )
        return HookSite(self.act_fns[layer], pre=False, layer=self.layer_modules[layer])

    def require_final_norm(self) -> nn.Module:
        """The final norm; MMNError when the adapter has none (folding it needs it)."""
        if self.final_norm is None:
            raise MMNError("fold_final_norm=True needs the final norm; pass final_norm='<path>' to load()")
        return self.final_norm

    def final_norm_site(self) -> HookSite:
        """Where the final norm's input [batch, pos, d_model] passes (its forward pre-hook)."""
        return HookSite(self.require_final_norm(), pre=True)

    @property
    def language_model(self) -> nn.Module:
        """The module that runs the decoder layers (the parent of `spec.layers`; it takes inputs_embeds)."""
        layers = self.spec.layers
        return get_module(self.model, layers.rsplit(".", 1)[0]) if "." in layers else self.model

    def norm_kind(self) -> str:
        """'rms' or 'layer' for the final norm (what folding it means)."""
        name = type(self.require_final_norm()).__name__.lower()
        return "layer" if ("layernorm" in name and "rms" not in name) else "rms"

    def norm_weight(self) -> torch.Tensor | None:
        """The final norm's effective scale: Gemma-family RMSNorms multiply by (1 + weight)."""
        w = getattr(self.final_norm, "weight", None)
        if w is None:
            return None
        w = w.detach()
        return 1 + w if "gemma" in type(self.final_norm).__name__.lower() else w

    def norm_eps(self) -> float:
        for attr in ("variance_epsilon", "eps", "epsilon"):
            if hasattr(self.final_norm, attr):
                return float(getattr(self.final_norm, attr))
        return 1e-6

    def describe(self) -> dict:
        return {**dataclasses.asdict(self.spec), "n_layers": self.n_layers, "d_mlp": self.d_mlp,
                "image_token_id": self.image_token_id, "has_act_fn": self.act_fns is not None}
