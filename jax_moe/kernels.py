"""Triton kernels of the fused MoE forward pass.

Pure Triton: nothing here imports JAX. The same ``@triton.jit`` functions are launched on the GPU
through jax-triton (``backend_triton``) and on the CPU through Triton's interpreter
(``backend_interpret``); ``pipeline`` strings them together.

Vocabulary shared by every kernel:

* ``T`` tokens, ``E`` experts, ``K = TOP_K`` experts per token, ``H`` hidden size, ``F`` expert
  intermediate size.
* A *pair* is one (token, slot) choice, numbered ``pair = token * TOP_K + slot``; there are
  ``NUM_PAIRS = T * TOP_K`` of them.
* Dispatch sorts the pairs by expert into *rows*. Each expert's segment of rows is padded to a
  multiple of ``BLOCK_M`` so that every row block of ``BLOCK_M`` rows belongs to one expert. Padding
  rows hold the sentinel pair ``NUM_PAIRS``. Grids are sized for the most row blocks any routing can
  need, ``MAX_BLOCKS = min(E, NUM_PAIRS) + cdiv(NUM_PAIRS, BLOCK_M)``; blocks past the ones in use
  are marked with expert ``-1`` and their programs exit at once.
"""

import triton
import triton.language as tl


@triton.jit
def route_kernel(
    logits_ptr,  # [T, E] any float dtype, row-major
    weights_ptr,  # out [T, TOP_K] float32
    ids_ptr,  # out [T, TOP_K] int32
    NUM_TOKENS: tl.constexpr,
    NUM_EXPERTS: tl.constexpr,
    EXPERTS_PAD: tl.constexpr,  # power of two >= NUM_EXPERTS
    TOP_K: tl.constexpr,
    TOP_K_PAD: tl.constexpr,  # power of two >= TOP_K
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Softmax routing with top-k selection.

    Grid: ``(cdiv(T, BLOCK_T),)``. Program ``p`` handles tokens ``[p * BLOCK_T, (p + 1) * BLOCK_T)``:
    it computes the fp32 softmax over all ``E`` logits of each token, picks the ``TOP_K`` largest
    (ties go to the lower expert index, like ``jax.lax.top_k``; selecting on the logits gives the
    same order as on the probabilities without depending on how ``exp`` rounds), and writes their
    probabilities, divided by their sum when ``RENORMALIZE``, with their expert ids.
    """
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, EXPERTS_PAD)
    slots = tl.arange(0, TOP_K_PAD)
    token_ok = tokens < NUM_TOKENS
    logits = tl.load(
        logits_ptr + tokens.to(tl.int64)[:, None] * NUM_EXPERTS + experts[None, :],
        mask=token_ok[:, None] & (experts[None, :] < NUM_EXPERTS),
        other=-float("inf"),
    ).to(tl.float32)

    row_max = tl.max(logits, axis=1)
    exps = tl.exp(logits - row_max[:, None])
    denominator = tl.sum(exps, axis=1)

    available = (experts < NUM_EXPERTS)[None, :] & token_ok[:, None]
    chosen_exps = tl.zeros([BLOCK_T, TOP_K_PAD], dtype=tl.float32)
    chosen_ids = tl.zeros([BLOCK_T, TOP_K_PAD], dtype=tl.int32)
    for slot in tl.static_range(TOP_K):
        best = tl.max(tl.where(available, logits, -float("inf")), axis=1)
        is_best = available & (logits == best[:, None])
        choice = tl.min(tl.where(is_best, experts[None, :], EXPERTS_PAD), axis=1)
        is_choice = experts[None, :] == choice[:, None]
        chosen = tl.sum(tl.where(is_choice, exps, 0.0), axis=1)
        chosen_exps = tl.where(slots[None, :] == slot, chosen[:, None], chosen_exps)
        chosen_ids = tl.where(slots[None, :] == slot, choice[:, None], chosen_ids)
        available = available & ~is_choice

    if RENORMALIZE:
        denominator = tl.sum(chosen_exps, axis=1)
    out_offsets = tokens.to(tl.int64)[:, None] * TOP_K + slots[None, :]
    out_mask = token_ok[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + out_offsets, chosen_exps / denominator[:, None], mask=out_mask)
    tl.store(ids_ptr + out_offsets, chosen_ids, mask=out_mask)


@triton.jit
def dispatch_kernel(
    expert_ids_ptr,  # [NUM_PAIRS] int32, pair p = token * TOP_K + slot
    sorted_pairs_ptr,  # out [MAX_BLOCKS * BLOCK_M] int32: the pair of each row, NUM_PAIRS = padding
    block_expert_ptr,  # out [MAX_BLOCKS] int32: expert of each row block, -1 = unused block
    NUM_PAIRS: tl.constexpr,
    EXPERTS_PAD: tl.constexpr,  # next power of two >= E
    BLOCK_M: tl.constexpr,
    MAX_BLOCKS: tl.constexpr,
    CHUNK: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,  # = cdiv(NUM_PAIRS, CHUNK)
):
    """Sorts the (token, slot) pairs by expert, padding each expert's rows to ``BLOCK_M``.

    Grid: ``(NUM_PROGRAMS,)``, with no communication between programs: each one histograms all
    ``NUM_PAIRS`` expert ids itself (cheap next to the GEMMs; it costs no host sync and no second
    launch). Program ``p``

    * places its own ``CHUNK`` pairs ``[p * CHUNK, (p + 1) * CHUNK)``: the row of a pair is its
      expert's padded segment start, plus the pairs of that expert in earlier chunks, plus those
      earlier in this chunk. The order is therefore stable (by pair index within an expert);
    * marks its grid-stride share of the rows that hold no pair (each segment's padding and every row
      past the last segment) with the sentinel ``NUM_PAIRS``;
    * writes its grid-stride share of the block -> expert map.

    Every row and every block is written by exactly one program.
    """
    pid = tl.program_id(0)
    lanes = tl.arange(0, CHUNK)
    experts = tl.arange(0, EXPERTS_PAD)
    my_start = pid * CHUNK

    counts = tl.zeros([EXPERTS_PAD], dtype=tl.int32)
    before_me = tl.zeros([EXPERTS_PAD], dtype=tl.int32)
    for start in range(0, NUM_PAIRS, CHUNK):
        in_range = start + lanes < NUM_PAIRS
        ids = tl.load(expert_ids_ptr + start + lanes, mask=in_range, other=0)
        hist = tl.histogram(ids, EXPERTS_PAD, mask=in_range)
        counts += hist
        before_me += tl.where(start < my_start, hist, 0)

    padded = tl.cdiv(counts, BLOCK_M) * BLOCK_M
    segment_end = tl.cumsum(padded, axis=0)
    segment_start = segment_end - padded
    rows_in_use = tl.sum(padded, axis=0)

    pairs = my_start + lanes
    in_range = pairs < NUM_PAIRS
    ids = tl.load(expert_ids_ptr + pairs, mask=in_range, other=0)
    same_expert_earlier = (ids[:, None] == ids[None, :]) & (lanes[None, :] < lanes[:, None])
    rank_in_chunk = tl.sum(same_expert_earlier.to(tl.int32), axis=1)
    row = tl.gather(segment_start + before_me, ids, 0) + rank_in_chunk
    tl.store(sorted_pairs_ptr + row, pairs, mask=in_range)

    # Loop bounds stay compile-time constants (the interpreter can't take tensor bounds).
    for stride_start in range(0, MAX_BLOCKS * BLOCK_M, NUM_PROGRAMS * CHUNK):
        rows = stride_start + my_start + lanes
        # The segment holding a row is the first whose end lies beyond it.
        owner = tl.sum((rows[:, None] >= segment_end[None, :]).to(tl.int32), axis=1)
        owner_clamped = tl.minimum(owner, EXPERTS_PAD - 1)
        real_end = tl.gather(segment_start + counts, owner_clamped, 0)
        is_filler = (rows >= real_end) | (rows >= rows_in_use)
        tl.store(
            sorted_pairs_ptr + rows,
            tl.full([CHUNK], NUM_PAIRS, tl.int32),
            mask=(rows < MAX_BLOCKS * BLOCK_M) & is_filler,
        )

    for stride_start in range(0, MAX_BLOCKS, NUM_PROGRAMS * CHUNK):
        blocks = stride_start + my_start + lanes
        first_rows = blocks * BLOCK_M
        owner = tl.sum((first_rows[:, None] >= segment_end[None, :]).to(tl.int32), axis=1)
        expert = tl.where(first_rows < rows_in_use, owner, -1)
        tl.store(block_expert_ptr + blocks, expert, mask=blocks < MAX_BLOCKS)


@triton.jit
def _row_block_and_column_tile(
    NUM_COL_TILES: tl.constexpr, MAX_BLOCKS: tl.constexpr, GROUP_M: tl.constexpr
):
    """Maps the 1-D program id to (row block, column tile), ``GROUP_M`` row blocks at a time so
    that programs running together share weight tiles in L2 (the Triton matmul tutorial's order).
    """
    pid = tl.program_id(0)
    programs_per_group = GROUP_M * NUM_COL_TILES
    first_block = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(MAX_BLOCKS - first_block, GROUP_M)
    block = first_block + (pid % programs_per_group) % group_rows
    col_tile = (pid % programs_per_group) // group_rows
    return block, col_tile


@triton.jit
def gate_up_kernel(
    x_ptr,  # [T, H] activations, row-major
    w_gate_ptr,  # [E, H, F] row-major
    w_up_ptr,  # [E, H, F] row-major
    sorted_pairs_ptr,  # [MAX_BLOCKS * BLOCK_M] int32, from dispatch_kernel
    block_expert_ptr,  # [MAX_BLOCKS] int32, from dispatch_kernel
    act_ptr,  # out [MAX_BLOCKS * BLOCK_M, F] in the activation dtype: silu(x @ gate) * (x @ up)
    NUM_PAIRS: tl.constexpr,
    TOP_K: tl.constexpr,
    HIDDEN: tl.constexpr,
    INTERMEDIATE: tl.constexpr,
    MAX_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grouped gate and up projections with the SwiGLU product in the epilogue.

    Grid: ``(MAX_BLOCKS * cdiv(F, BLOCK_N),)``. A program owns one row block (one expert) and one
    tile of ``BLOCK_N`` intermediate columns. It gathers its token rows of ``x`` through
    ``sorted_pairs`` (no permuted copy of the activations), loads each ``[BLOCK_M, BLOCK_K]``
    activation tile once for both projections, accumulates both in fp32, and writes
    ``silu(gate) * up`` for its rows (padding rows get zeros). Unused blocks exit at once.
    """
    num_col_tiles: tl.constexpr = (INTERMEDIATE + BLOCK_N - 1) // BLOCK_N
    block, col_tile = _row_block_and_column_tile(num_col_tiles, MAX_BLOCKS, GROUP_M)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return

    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    is_real = pairs < NUM_PAIRS
    tokens = (pairs // TOP_K).to(tl.int64)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < INTERMEDIATE
    ks = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + tokens[:, None] * HIDDEN + ks[None, :]
    w_offsets = expert.to(tl.int64) * HIDDEN * INTERMEDIATE + ks[:, None] * INTERMEDIATE + cols[None, :]
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, HIDDEN, BLOCK_K):
        k_ok = ks < HIDDEN - k_start
        x = tl.load(x_ptrs, mask=is_real[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(w_gate_ptr + w_offsets, mask=w_mask, other=0.0)
        w_up = tl.load(w_up_ptr + w_offsets, mask=w_mask, other=0.0)
        acc_gate = tl.dot(x, w_gate, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(x, w_up, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_offsets += BLOCK_K * INTERMEDIATE

    act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    act_ptrs = act_ptr + rows.to(tl.int64)[:, None] * INTERMEDIATE + cols[None, :]
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit
def down_combine_kernel(
    act_ptr,  # [MAX_BLOCKS * BLOCK_M, F] from gate_up_kernel
    w_down_ptr,  # [E, F, H] row-major
    routing_weights_ptr,  # [NUM_PAIRS] float32
    sorted_pairs_ptr,  # [MAX_BLOCKS * BLOCK_M] int32
    block_expert_ptr,  # [MAX_BLOCKS] int32
    out_ptr,  # out [T, H] in the activation dtype
    partial_ptr,  # out (scratch) [NUM_PAIRS, H] float32, one weighted expert output per pair
    arrivals_ptr,  # out (scratch, zeroed before launch) [T, cdiv(H, BLOCK_N)] int32
    NUM_PAIRS: tl.constexpr,
    TOP_K: tl.constexpr,
    HIDDEN: tl.constexpr,
    INTERMEDIATE: tl.constexpr,
    MAX_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grouped down projection, routing weight in the epilogue, deterministic top-k combine.

    Grid: ``(MAX_BLOCKS * cdiv(H, BLOCK_N),)``. A program owns one row block (one expert) and one
    tile of ``BLOCK_N`` hidden columns; it computes ``act[rows] @ w_down[expert][:, cols]`` in fp32
    and scales each row by its pair's routing weight.

    With ``TOP_K == 1`` that row is the token's output. Otherwise each pair's row goes to
    ``partial`` and the program counts one arrival per (token, column tile); the program that brings
    a token's count to ``TOP_K`` sums the token's ``TOP_K`` partial rows in slot order and writes the
    output. The sum's order never depends on scheduling, so every run gives the same bits, with no
    extra launch. A token's ``TOP_K`` pairs all sit in different experts, so the rows of one block
    never share a counter.
    """
    num_col_tiles: tl.constexpr = (HIDDEN + BLOCK_N - 1) // BLOCK_N
    block, col_tile = _row_block_and_column_tile(num_col_tiles, MAX_BLOCKS, GROUP_M)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return

    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    is_real = pairs < NUM_PAIRS
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < HIDDEN
    ks = tl.arange(0, BLOCK_K)

    act_ptrs = act_ptr + rows.to(tl.int64)[:, None] * INTERMEDIATE + ks[None, :]
    w_offsets = expert.to(tl.int64) * INTERMEDIATE * HIDDEN + ks[:, None] * HIDDEN + cols[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, INTERMEDIATE, BLOCK_K):
        k_ok = ks < INTERMEDIATE - k_start
        act = tl.load(act_ptrs, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_down_ptr + w_offsets, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(act, w, acc, input_precision=DOT_PRECISION)
        act_ptrs += BLOCK_K
        w_offsets += BLOCK_K * HIDDEN

    routing_weight = tl.load(routing_weights_ptr + pairs, mask=is_real, other=0.0)
    acc = acc * routing_weight[:, None]
    tokens = (pairs // TOP_K).to(tl.int64)
    out_dtype = out_ptr.dtype.element_ty

    if TOP_K == 1:
        out_ptrs = out_ptr + tokens[:, None] * HIDDEN + cols[None, :]
        tl.store(out_ptrs, acc.to(out_dtype), mask=is_real[:, None] & col_ok[None, :])
    else:
        partial_rows = partial_ptr + pairs.to(tl.int64)[:, None] * HIDDEN + cols[None, :]
        tl.store(partial_rows, acc, mask=is_real[:, None] & col_ok[None, :])
        # Every thread's partial stores must be done before any thread announces the arrival;
        # the acq_rel atomic then publishes them to the program that finishes the token.
        tl.debug_barrier()
        arrived_before = tl.atomic_add(
            arrivals_ptr + tokens * num_col_tiles + col_tile, 1, mask=is_real, sem="acq_rel", scope="gpu"
        )
        finishes = is_real & (arrived_before == TOP_K - 1)
        tl.debug_barrier()
        total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        first_pair = tokens * TOP_K
        for slot in tl.static_range(TOP_K):
            # .cg: read from L2, where other programs' partial rows landed, not from a stale L1.
            total += tl.load(
                partial_ptr + (first_pair + slot)[:, None] * HIDDEN + cols[None, :],
                mask=finishes[:, None] & col_ok[None, :],
                other=0.0,
                cache_modifier=".cg",
            )
        out_ptrs = out_ptr + tokens[:, None] * HIDDEN + cols[None, :]
        tl.store(out_ptrs, total.to(out_dtype), mask=finishes[:, None] & col_ok[None, :])
