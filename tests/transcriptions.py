"""Straight transcriptions of the published reference code (IST-DASLab/gptq ``quant.Quantizer``, ``GPTQ.fasterquant``;
IST-DASLab/sparsegpt ``SparseGPT.fasterprune``), kept apart from the project's code so tests compare against them.

Each transcription also reports its *margin*: how close its closest discrete decision came to going the other way
(a weight on a grid's rounding midpoint, or two pruning scores on either side of the mask's cut). Two correct
implementations that sum in another order differ by ~1e-15 relative in float64; a decision closer than that to its
tie may fall either way on another machine or thread count, and one flipped decision cascades through the later
updates. A comparison is therefore only valid when every margin is far above that noise: tests assert it
(``TIE_MARGIN``) on their data instead of assuming it."""
from __future__ import annotations

import torch

TIE_MARGIN = 1e-9  # smallest allowed distance of a decision from its tie (grid units, or relative score gap)


class Margin:
    """The smallest distance of any decision from its tie, over one transcription run."""

    def __init__(self) -> None:
        self.value = float("inf")

    def grid(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> None:
        """Rounding x/scale + zero: a midpoint matters only where both neighbours lie on the grid [0, maxq]."""
        v = (x / scale + zero).flatten()
        inside = (v >= 0) & (v <= maxq)
        if inside.any():
            self.value = min(self.value, float(((v - v.floor()) - 0.5).abs()[inside].min()))

    def cut(self, scores: torch.Tensor, k: int) -> None:
        """Choosing the k lowest of each row of ``scores``: the relative gap between the k-th and (k+1)-th lowest."""
        if 0 < k < scores.shape[-1]:
            s = scores.sort(dim=-1).values
            gap = (s[..., k] - s[..., k - 1]) / s[..., k].abs().clamp_min(1e-300)
            self.value = min(self.value, float(gap.min()))


def find_params(x: torch.Tensor, bits: int, sym: bool):
    """quant.Quantizer.find_params(x, weight=True) with perchannel=True, mse=False: a min-max grid per row."""
    maxq = 2**bits - 1
    zeros = torch.zeros(x.shape[0], dtype=x.dtype)
    xmin = torch.minimum(x.min(1)[0], zeros)
    xmax = torch.maximum(x.max(1)[0], zeros)
    if sym:
        xmax = torch.maximum(torch.abs(xmin), xmax)
        negative = xmin < 0
        xmin[negative] = -xmax[negative]
    empty = (xmin == 0) & (xmax == 0)
    xmin[empty] = -1
    xmax[empty] = +1
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale.reshape(-1, 1), zero.reshape(-1, 1), maxq


def quantize(x, scale, zero, maxq, margin: Margin | None = None):
    """quant.quantize; records the rounding margin when given one."""
    if margin is not None:
        margin.grid(x, scale, zero, maxq)
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def damped_inverse_factor(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Both references: damp the diagonal, then Cholesky, inverse, upper Cholesky (``H`` is modified)."""
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(H.shape[0])
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    return torch.linalg.cholesky(H, upper=True)


def fasterquant(weight: torch.Tensor, hessian: torch.Tensor, bits: int, sym: bool = False, groupsize: int = -1,
                actorder: bool = False, static_groups: bool = False, blocksize: int = 128, percdamp: float = 0.01,
                margin: Margin | None = None) -> torch.Tensor:
    """GPTQ.fasterquant: the quantized weight."""
    W = weight.clone()
    H = hessian.clone()
    columns = W.shape[1]
    params = find_params(W, bits, sym)  # "if not self.quantizer.ready()": the per-channel grid

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    if static_groups:
        groups = [find_params(W[:, i : i + groupsize], bits, sym) for i in range(0, columns, groupsize)]
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)

    Q = torch.zeros_like(W)
    Hinv = damped_inverse_factor(H, percdamp)

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        params = find_params(W[:, (i1 + i) : (i1 + i + groupsize)], bits, sym)  # W, not W1
                else:
                    idx = i1 + i
                    if actorder:
                        idx = perm[idx]
                    params = groups[idx // groupsize]
            q = quantize(w.unsqueeze(1), *params, margin).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    if actorder:
        Q = Q[:, invperm]
    return Q


def fasterprune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, prunen: int = 0, prunem: int = 0,
                blocksize: int = 128, percdamp: float = 0.01, bits: int = 16, exact_k: bool = True,
                margin: Margin | None = None) -> torch.Tensor:
    """SparseGPT.fasterprune (the published code, in the given dtype). ``bits`` < 16: the reference's joint mode,
    a quantizer with a per-row min-max grid fitted on the weight before pruning. ``exact_k=False`` keeps the
    published mask rule, ``tmp <= sort(tmp)[int(numel·sparsity)]``, which prunes the k+1 lowest scores of a block
    (more on ties); ``exact_k=True`` prunes exactly the k = int(numel·sparsity) lowest, the first ones on ties."""
    W = weight.clone()
    H = hessian.clone()
    columns = W.shape[1]
    quantizer = find_params(W, bits, sym=False) if bits < 16 else None

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    Hinv = damped_inverse_factor(H, percdamp)

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            k = int(tmp.numel() * sparsity)
            if margin is not None:
                margin.cut(tmp.flatten()[None, :], k)
            if exact_k:
                mask1 = torch.zeros(tmp.numel(), dtype=torch.bool)
                mask1[torch.sort(tmp.flatten(), stable=True).indices[:k]] = True
                mask1 = mask1.view_as(tmp)
            else:
                thresh = torch.sort(tmp.flatten())[0][k]
                mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                if margin is not None:
                    margin.cut(tmp, prunen)
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            if quantizer is not None:
                q = quantize(q.unsqueeze(1), *quantizer, margin).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


# --- AWQ: mit-han-lab/llm-awq awq/quantize/{quantizer,auto_scale,auto_clip}.py, for a Llama decoder layer ---------
# Its rounding acts elementwise on the same numbers in both implementations (bitwise equal: no sum precedes it), so
# only its searches' argmins, which compare sums, are checked for ties (``margin``).

def awq_pseudo_quantize(w: torch.Tensor, n_bit: int, q_group_size: int, margin: Margin | None = None) -> torch.Tensor:
    """quantizer.pseudo_quantize_tensor(w, n_bit, zero_point=True, q_group_size)."""
    org_w_shape = w.shape
    if q_group_size > 0:
        w = w.reshape(-1, q_group_size)
    max_val = w.amax(dim=1, keepdim=True)
    min_val = w.amin(dim=1, keepdim=True)
    max_int = 2**n_bit - 1
    scales = (max_val - min_val).clamp(min=1e-5) / max_int
    zeros = (-torch.round(min_val / scales)).clamp_(0, max_int)
    if margin is not None:
        margin.grid(w, scales, zeros, max_int)
    w = (torch.clamp(torch.round(w / scales) + zeros, 0, max_int) - zeros) * scales
    return w.reshape(org_w_shape)


def _argmin_margin(margin: Margin | None, losses: list[float]) -> None:
    """The relative gap between the least and the second least loss of a search: a tie would make it arbitrary."""
    if margin is not None and len(losses) > 1:
        least, second = sorted(losses)[:2]
        margin.value = min(margin.value, (second - least) / max(abs(second), 1e-300))


def awq_search_module_scale(block, linears2scale, x, kwargs, n_bit, group, margin=None, n_grid=20):
    """auto_scale_block._search_module_scale: the best scales of one group."""
    org_out = block(x, **kwargs)
    if isinstance(org_out, tuple):
        org_out = org_out[0]
    x_max = x.abs().view(-1, x.shape[-1]).mean(0)  # get_act_scale
    best_error, best_scales, history = float("inf"), None, []
    org_sd = {k: v.clone() for k, v in block.state_dict().items()}
    for ratio in range(n_grid):
        ratio = ratio * 1 / n_grid
        scales = x_max.pow(ratio).clamp(min=1e-4).view(-1)
        scales = scales / (scales.max() * scales.min()).sqrt()
        for fc in linears2scale:
            fc.weight.mul_(scales.view(1, -1))
            fc.weight.data = awq_pseudo_quantize(fc.weight.data, n_bit, group) / (scales.view(1, -1))
        out = block(x, **kwargs)
        if isinstance(out, tuple):
            out = out[0]
        loss = (org_out - out).float().pow(2).mean().item()
        history.append(loss)
        if loss < best_error:
            best_error, best_scales = loss, scales
        block.load_state_dict(org_sd)
    _argmin_margin(margin, history)
    return best_scales.view(-1)


def awq_auto_clip_layer(w, input_feat, n_bit, group, margin=None, n_grid=20, max_shrink=0.5, n_sample_token=512):
    """auto_clip.auto_clip_layer, one batch of all output channels (the reference's batching changes nothing)."""
    input_feat = input_feat.view(-1, input_feat.shape[-1])
    input_feat = input_feat.reshape(1, input_feat.shape[0], -1, group)
    input_feat = input_feat[:, 0::input_feat.shape[1] // n_sample_token]
    w = w.reshape(w.shape[0], 1, -1, group)
    org_max_val = w.abs().amax(dim=-1, keepdim=True)
    best_max_val = org_max_val.clone()
    min_errs = torch.ones_like(org_max_val) * 1e9
    org_out = (input_feat * w).sum(dim=-1)
    errs = []
    for i_s in range(int(max_shrink * n_grid)):
        max_val = org_max_val * (1 - i_s / n_grid)
        cur_w = torch.clamp(w, -max_val, max_val)
        q_w = awq_pseudo_quantize(cur_w, n_bit, group)
        cur_out = (input_feat * q_w).sum(dim=-1)
        err = (cur_out - org_out).pow(2).mean(dim=1).view(min_errs.shape)
        errs.append(err.flatten())
        cur_best_idx = err < min_errs
        min_errs[cur_best_idx] = err[cur_best_idx]
        best_max_val[cur_best_idx] = max_val[cur_best_idx]
    if margin is not None:
        e = torch.stack(errs, 1).sort(dim=1).values
        margin.value = min(margin.value, float(((e[:, 1] - e[:, 0]) / e[:, 1].abs().clamp_min(1e-300)).min()))
    return best_max_val.squeeze(1)


def awq_llama_layer(layer, x, kwargs, n_bit, group, margin=None, n_sample_token=512):
    """run_awq's per-layer work on a Llama decoder layer (input features, auto_scale_block + apply_scale,
    auto_clip_block + apply_clip), then pseudo_quantize_model_weight; ``layer`` is changed in place."""
    named_linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    input_feat, handles = {}, []
    for name, m in named_linears.items():
        handles.append(m.register_forward_hook(lambda m, inp, out, name=name: input_feat.__setitem__(name, inp[0])))
    layer(x, **kwargs)
    for h in handles:
        h.remove()
    attn, mlp = layer.self_attn, layer.mlp
    groups = [(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], "self_attn.q_proj", attn, kwargs)]
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        groups.append((attn.v_proj, [attn.o_proj], "self_attn.o_proj", attn.o_proj, {}))
    groups += [(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], "mlp.gate_proj", mlp, {}),
               (mlp.up_proj, [mlp.down_proj], "mlp.down_proj", mlp.down_proj, {})]
    scales_list = [(prev, fcs, awq_search_module_scale(inspect, fcs, input_feat[feat], kw, n_bit, group, margin))
                   for prev, fcs, feat, inspect, kw in groups]
    names = {id(m): n for n, m in layer.named_modules()}
    for prev, fcs, scales in scales_list:  # apply_scale
        if isinstance(prev, torch.nn.Linear):  # scale_fc_fc
            prev.weight[-scales.size(0):].div_(scales.view(-1, 1))
            fcs[0].weight.mul_(scales.view(1, -1))
        else:  # scale_ln_fcs
            prev.weight.div_(scales)
            for fc in fcs:
                fc.weight.mul_(scales.view(1, -1))
        for fc in fcs:
            input_feat[names[id(fc)]] = input_feat[names[id(fc)]] / scales.view(1, -1)
    for name, m in named_linears.items():  # auto_clip_block, apply_clip
        if any(_ in name for _ in ["q_", "k_", "query", "key", "Wqkv"]):
            continue
        max_val = awq_auto_clip_layer(m.weight, input_feat[name], n_bit, group, margin, n_sample_token=n_sample_token)
        shape = m.weight.shape
        m.weight.data = torch.clamp(m.weight.data.reshape(*max_val.shape[:2], -1), -max_val, max_val).reshape(shape)
    for m in named_linears.values():
        m.weight.data = awq_pseudo_quantize(m.weight.data, n_bit, group)
