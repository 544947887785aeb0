"""READ's side network (Algorithm 1 of arXiv 2305.15348, DESIGN.md section 1) and its task heads.

    from read_cache.training.side_network import SideNetwork, SideNetworkConfig, count_trainable
    net = SideNetwork(SideNetworkConfig(rnn="gru", dim=256, d_model=768, n_encoder_layers=12, n_decoder_layers=12))
    count_trainable(net)                     # 1,971,456 = 1,969,920 (paper, Table 4) + 2 x 768 norm scales

Torch only: the frozen backbone's states arrive as tensors (from the cache, or from `predict`).
The RNNs run over the LAYER axis with tokens (encoder) or examples (decoder) as the batch, so one
`nn.GRU(d, r)` call is N_E applications of one shared cell: parameters do not grow with depth.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from read_cache.errors import ReadCacheError
from read_cache.kinds import HeadKind, Pooling, RNNKind, check_choice

_RNN_CLASSES = {RNNKind.GRU: nn.GRU, RNNKind.LSTM: nn.LSTM, RNNKind.RNN: nn.RNN}


@dataclasses.dataclass
class SideNetworkConfig:
    """Everything needed to rebuild a side network and its head (saved as `config.json` of a run)."""

    rnn: str = "gru"
    """Recurrent cell shared across layers: 'gru', 'lstm', 'rnn' (Elman, tanh), or 'none' (probe baseline)."""
    dim: int = 256
    """Hidden size r of the RNNs (`--dim`)."""
    d_model: int = 768
    """Width d of the backbone's hidden states."""
    n_encoder_layers: int = 12
    """N_E: encoder layers the cache holds (the RNN takes this many steps)."""
    n_decoder_layers: int = 12
    """N_D: decoder layers the cache holds; 0 for encoder-only caches."""
    encoder_only: bool = False
    """True for BERT-family and decoder-only caches: no decoder stack, no cross-attention; the head reads pooled tokens."""
    causal: bool = False
    """True for decoder-only (causal LM) caches: the recurrence runs over the LM's layers, and the `lm` head may
    score the label words at the readout (last) token, as the LM itself would."""
    pooling: str = "mean"
    """Encoder-only: pool the example's real tokens by 'mean' (sentence-transformers) or take the 'first' ([CLS]);
    decoder-only: the 'last' token (the readout), or the 'mean' (linear head)."""
    head: str = "lm"
    """'lm': the frozen LM head scores the label words (T5 classification); 'linear': a trainable Linear(d, classes)."""
    num_labels: int = 2
    """Classes (label words for 'lm'); 1 means regression (STS-B) with an MSE loss."""
    output_scale: float = 1.0
    """'lm' only: T5 scales the decoder output by d**-0.5 before its LM head (the cache records it)."""
    lm_bias: list[float] | None = None
    """'lm' only: the LM head's bias at the label tokens (Phi's head has one; the cache records it)."""
    logit_softcap: float | None = None
    """'lm' only: the LM's logit soft cap, cap * tanh(z / cap) (Gemma 2; the cache records it)."""
    recurrence: bool = True
    """True: one cell shared by every layer (READ). False: a separate cell per layer (the paper's Table 2
    ablation, `--no-recurrence`), so the RNNs' parameters grow N_E (+ N_D) times."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_choice("--rnn", self.rnn, RNNKind)
        check_choice("--head", self.head, HeadKind)
        check_choice("--pooling", self.pooling, Pooling)
        if self.dim <= 0:
            raise ReadCacheError(f"--dim {self.dim} must be a positive RNN hidden size (the paper uses 128 or 256)")
        if self.num_labels < 1:
            raise ReadCacheError(f"num_labels {self.num_labels} must be at least 1 (1 = regression)")
        if self.head == HeadKind.LM and self.encoder_only and not self.causal:
            raise ReadCacheError("--head lm needs a T5 or decoder-only cache's LM head, and this cache is encoder-only; use --head linear")
        if self.head == HeadKind.LM and self.causal and self.pooling != Pooling.LAST:
            raise ReadCacheError(f"--head lm scores the label words at the last token, so --pooling {self.pooling} cannot go with it; leave --pooling out or use --head linear")
        if self.head == HeadKind.LM and self.regression:
            raise ReadCacheError("--head lm cannot score a regression task (STS-B has no label words); use --head linear")

    @property
    def regression(self) -> bool:
        return self.num_labels == 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SideNetworkConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def make_rnn(kind: str, d_model: int, dim: int, layers: int | None = None) -> nn.Module:
    """An RNN over the layer axis: input [batch, layers, d] -> (output [batch, layers, r], last state).

    `layers=None`: one cell shared across layers (READ). `layers=N`: N separate cells, one per layer
    (the no-recurrence ablation); its parameter count is N times the shared cell's.
    """
    if layers is None:
        return _RNN_CLASSES[RNNKind(kind)](d_model, dim, batch_first=True)
    return LayerwiseRNN(kind, d_model, dim, layers)


_CELL_CLASSES = {RNNKind.GRU: nn.GRUCell, RNNKind.LSTM: nn.LSTMCell, RNNKind.RNN: nn.RNNCell}


class LayerwiseRNN(nn.Module):
    """The same recursion h[i] = cell_i(x[i], h[i-1]) with a separate cell per layer (no weight sharing)."""

    def __init__(self, kind: str, d_model: int, dim: int, layers: int):
        super().__init__()
        self.lstm = RNNKind(kind) == RNNKind.LSTM
        self.cells = nn.ModuleList(_CELL_CLASSES[RNNKind(kind)](d_model, dim) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        if x.shape[1] != len(self.cells):
            raise ReadCacheError(f"this no-recurrence side network has {len(self.cells)} cells but the states have {x.shape[1]} layers")
        state: Any = None
        outputs = []
        for i, cell in enumerate(self.cells):
            state = cell(x[:, i], state)
            outputs.append(state[0] if self.lstm else state)
        return torch.stack(outputs, dim=1), None


def joiner(d_model: int) -> nn.RMSNorm:
    # T5's residual stream grows layer by layer; an RMSNorm with a learnable scale evens it out.
    return nn.RMSNorm(d_model, eps=1e-6)


class SideNetwork(nn.Module):
    """READ's side network plus a task head; `forward` maps cached states to logits.

    Submodules (absent with rnn='none'): `encoder_norm`, `encoder_rnn`, `up`, and for T5 caches
    `psi`, `decoder_norm`, `decoder_rnn`. Head: `lm_rows` (a frozen buffer) or `classifier`.
    """

    def __init__(self, config: SideNetworkConfig, lm_rows: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        c = config
        if c.rnn != RNNKind.NONE:
            self.encoder_norm = joiner(c.d_model)
            self.encoder_rnn = make_rnn(c.rnn, c.d_model, c.dim, None if c.recurrence else c.n_encoder_layers)
            if not c.encoder_only:
                self.psi = nn.Linear(c.dim, c.d_model, bias=False)
                self.decoder_norm = joiner(c.d_model)
                self.decoder_rnn = make_rnn(c.rnn, c.d_model, c.dim, None if c.recurrence else c.n_decoder_layers)
            self.up = nn.Linear(c.dim, c.d_model)
            # Zero correction at the start: training begins from the frozen model's own output.
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        if c.head == HeadKind.LM:
            rows = torch.zeros(c.num_labels, c.d_model) if lm_rows is None else torch.as_tensor(lm_rows, dtype=torch.float32)
            if tuple(rows.shape) != (c.num_labels, c.d_model):
                raise ReadCacheError(f"the cache's LM-head rows have shape {tuple(rows.shape)}, expected ({c.num_labels}, {c.d_model}); rebuild the cache")
            self.register_buffer("lm_rows", rows.clone())  # [C, d], frozen
        else:
            self.classifier = nn.Linear(c.d_model, c.num_labels)

    # --- Algorithm 1 -------------------------------------------------------------------------------
    def encoder_corrections(self, enc: torch.Tensor) -> torch.Tensor:
        """h_E[N_E] per token: [T, N_E, d] -> [T', r], T' = `padded_rows(T)`; h_E[0] = 0 is the RNN's default
        initial state. The tokens are padded with zero rows (see `padded_rows`), and the callers keep the padding
        through the next matrix product (Up) and drop it after: those are the ops whose shapes follow T. The rows are
        independent, so the real ones' corrections are those of the RNN run on them alone."""
        x = self.encoder_norm(enc)
        extra = padded_rows(len(x)) - len(x)
        if extra:
            x = F.pad(x, (0, 0, 0, 0, 0, extra))  # zero rows after the last token
        out, _ = self.encoder_rnn(x)  # [T', N_E, r]
        return out[:, -1]

    def decoder_output(self, h_enc: torch.Tensor, cross: torch.Tensor, token_example: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
        """phi_D' = phi_D[N_D] + Up(h_D[N_D]) per example: [B, d]."""
        if cross.dim() == 3:  # [T, N_D, H]: per-head maps, averaged (the paper's single head)
            cross = cross.mean(dim=-1)
        # psi[b, j] = sum_beta sigma[beta, j] Psi(h[beta]) = Psi(sum_beta sigma[beta, j] h[beta]): Psi is linear.
        weighted = cross.unsqueeze(-1).to(h_enc.dtype) * h_enc.unsqueeze(1)  # [T, N_D, r]
        summed = weighted.new_zeros(dec.shape[0], *weighted.shape[1:]).index_add_(0, token_example, weighted)
        x = self.decoder_norm(dec) + self.psi(summed)  # [B, N_D, d]
        out, _ = self.decoder_rnn(x)  # [B, N_D, r]
        return dec[:, -1] + self.up(out[:, -1])

    def features(
        self,
        *,
        enc: torch.Tensor,
        token_example: torch.Tensor,
        n_examples: int,
        cross: torch.Tensor | None = None,
        dec: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """What the head reads, [B, d]: the adapted decoder output, or pooled adapted tokens (encoder-only).

        enc [T, N_E, d]; token_example [T] (example row in the batch, ascending); cross [T, N_D(, H)];
        dec [B, N_D, d].
        """
        c = self.config
        if not c.encoder_only:
            if cross is None or dec is None:
                raise ValueError("a T5 side network needs cross-attention and decoder states")
            if c.rnn == RNNKind.NONE:
                return dec[:, -1]
            return self.decoder_output(self.encoder_corrections(enc)[: len(enc)], cross, token_example, dec)
        tokens = enc[:, -1]
        if c.rnn != RNNKind.NONE:
            tokens = tokens + self.up(self.encoder_corrections(enc))[: len(tokens)]  # [T, d]
        return pool(tokens, token_example, n_examples, c.pooling)

    def forward(self, **states: Any) -> torch.Tensor:
        """Logits [B, C] for classification, scores [B] for regression; arguments as `features`."""
        x = self.features(**states)
        if self.config.head == HeadKind.LM:
            # [B, d] x [d, C] is cheap: keep the logits in fp32 even under bf16 autocast.
            with torch.autocast(device_type=x.device.type, enabled=False):
                c = self.config
                return lm_logits(x.float(), self.lm_rows, c.output_scale, c.lm_bias, c.logit_softcap)
        out = self.classifier(x).float()
        return out.squeeze(-1) if self.config.regression else out

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.config.regression:
            return F.mse_loss(logits, labels.float())
        return F.cross_entropy(logits, labels.long())

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """Class ids [B] (or the scores themselves for regression)."""
        return logits if self.config.regression else logits.argmax(dim=-1)


def padded_rows(n: int) -> int:
    """n rounded up to one of 16 sizes per octave (at most 1/16 more): the rows the encoder RNN and Up run over.

    Their batch is a training batch's token count, different nearly every batch. On a CPU under bf16 autocast, oneDNN
    and torch's ideep layer keep compiled kernels per input shape, up to 1,024 shapes each, so memory grew with the
    split: a streaming GRU/256 epoch's peak RSS was 2.8 GB over 20,000 MiniLM SST-2 examples and 3.4 GB over all 67,349
    (fp32, which takes no such kernels, 1.57 GB both). Padded, 1.66 and 1.70 GB, and the epochs ran 10-15% faster
    (docs/benchmarks.md, fourteenth session). The real rows' outputs are bit for bit those of the unpadded call; the
    weights' gradients sum over more (zero) rows, which moves them by rounding only."""
    step = 1 << max(0, n.bit_length() - 5)
    return -(-n // step) * step


def lm_logits(
    x: torch.Tensor, rows: torch.Tensor, scale: float = 1.0, bias: torch.Tensor | list[float] | None = None, softcap: float | None = None
) -> torch.Tensor:
    """The LM head over the label words, [B, d] x [C, d] -> [B, C], as the model applies it: T5's output scale,
    the head's bias (Phi), the logit soft cap (Gemma 2). READ's `lm` head and the baselines' share it."""
    logits = (scale * x) @ rows.T
    if bias is not None:
        logits = logits + torch.as_tensor(bias, dtype=logits.dtype, device=logits.device)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def pool(tokens: torch.Tensor, token_example: torch.Tensor, n_examples: int, how: str) -> torch.Tensor:
    """[T, d] per-token vectors -> [B, d]: the mean over each example's tokens, its first token, or its last."""
    counts = torch.bincount(token_example, minlength=n_examples)  # [B]
    if how == Pooling.FIRST:
        return tokens[torch.cumsum(counts, 0) - counts]
    if how == Pooling.LAST:
        return tokens[torch.cumsum(counts, 0) - 1]
    summed = tokens.new_zeros(n_examples, tokens.shape[-1]).index_add_(0, token_example, tokens)
    return summed / counts.clamp(min=1).unsqueeze(-1).to(summed.dtype)


def forward_batch(net: SideNetwork, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`net(...)` on a reader batch (keys enc, token_example, rows, and cross/dec for T5 caches)."""
    return net(
        enc=batch["enc"],
        token_example=batch["token_example"],
        n_examples=len(batch["rows"]),
        cross=batch.get("cross"),
        dec=batch.get("dec"),
    )


def rnn_cell_parameters(kind: str, d_model: int, dim: int) -> int:
    """Parameters of one cell: gates x (input weights d*r + hidden weights r*r + two biases 2r)."""
    gates = {RNNKind.GRU: 3, RNNKind.LSTM: 4, RNNKind.RNN: 1}[RNNKind(kind)]
    return gates * dim * (d_model + dim + 2)


def expected_parameters(config: SideNetworkConfig) -> int:
    """The trainable-parameter formula of a side network and its head (what `count_trainable` must give).

    T5 caches: encoder cell(s) + decoder cell(s) + Psi (r*d) + Up (r*d + d) + two norm scales (2d); shared cells
    count once, the no-recurrence ablation counts one per layer. Encoder-only and decoder-only: one RNN, Up and one
    scale, g*r*(d + r + 2) + (r*d + d) + d, plus the head: 0 for `lm` (frozen rows), d*C + C for `linear`.
    """
    c = config
    head = 0 if c.head == HeadKind.LM else c.d_model * c.num_labels + c.num_labels
    if c.rnn == RNNKind.NONE:
        return head
    cell = rnn_cell_parameters(c.rnn, c.d_model, c.dim)
    up = c.dim * c.d_model + c.d_model
    encoder = cell * (1 if c.recurrence else c.n_encoder_layers) + c.d_model
    if c.encoder_only:
        return encoder + up + head
    decoder = cell * (1 if c.recurrence else c.n_decoder_layers) + c.d_model
    return encoder + decoder + c.dim * c.d_model + up + head


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def parameter_breakdown(module: nn.Module) -> dict[str, int]:
    """Trainable parameters per top-level submodule, e.g. {'encoder_rnn': 787968, 'psi': 196608, ...}."""
    counts: dict[str, int] = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            part = name.split(".")[0]
            counts[part] = counts.get(part, 0) + p.numel()
    return counts
