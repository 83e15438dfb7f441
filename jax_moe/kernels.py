"""Triton kernels of the fused MoE layer, forward and backward.

Pure Triton: nothing here imports JAX. The same ``@triton.jit`` functions are launched on the GPU
through jax-triton (``backend_triton``) and on the CPU through Triton's interpreter
(``backend_interpret``); ``pipeline`` strings them together.

Vocabulary shared by every kernel:

* ``T`` tokens, ``E`` experts, ``K = TOP_K`` experts per token, ``H`` hidden size, ``F`` expert
  intermediate size.
* Expert ids ``[0, E)`` are the routed experts; ids ``[E, E + S)`` are ``S`` shared experts that
  every token uses (DeepSeek-V3, Qwen2-MoE), given to the kernels as extra always-chosen slots.
  Their weights stay in arrays of their own; ``_expert_matrix`` picks the array per row block.
  Past routing, ``TOP_K`` counts those slots too (``k + S``), and ``E`` in the grid sizes below
  means ``E + S``.
* A *pair* is one (token, slot) choice, numbered ``pair = token * TOP_K + slot``; there are
  ``NUM_PAIRS = T * TOP_K`` of them.
* Expert weights are float, or quantized (``W_FORMAT``: fp8, int8, int4, mxfp4; scales per
  ``SCALE_BLOCK_K x SCALE_BLOCK_N`` block, optional zero points): the GEMMs dequantize each weight
  tile in registers (``_dequantized_tile``) before the same ``tl.dot``, or with fp8 activations
  (``ACT_FP8``, w8a8) multiply fp8 tiles and apply both scales per K step (``_fp8_scaled_dot``).
  Float layers compile exactly the float path: the switches are constexprs.
* Dispatch sorts the pairs by expert into *rows*. Each expert's segment of rows is padded to a
  multiple of ``BLOCK_M`` so that every row block of ``BLOCK_M`` rows belongs to one expert. Padding
  rows hold the sentinel pair ``NUM_PAIRS``. Grids are sized for the most row blocks any routing can
  need, ``MAX_BLOCKS = min(E, NUM_PAIRS) + cdiv(NUM_PAIRS, BLOCK_M)``; blocks past the ones in use
  are marked with expert ``-1`` and their programs exit at once.
"""

import triton
import triton.language as tl


# Below every key _ranking_keys makes (the high half of -NaN's), so an excluded entry never wins.
NO_KEY = tl.constexpr(-(2**63))


@triton.jit
def _ranking_keys(values, ids, IDS_PAD: tl.constexpr):
    """int64 keys that order like the fp32 ``values`` in ``jax.lax.top_k``'s total order (-0.0
    below 0.0, NaN above inf), ties going to the lower id: the value's bits, made to order as
    integers, then ``IDS_PAD - 1 - id``. One max reduction finds the best value and its id."""
    bits = values.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(tl.int64) << 32) | (IDS_PAD - 1 - ids).to(tl.int64)


@triton.jit
def _key_id(keys, IDS_PAD: tl.constexpr):
    """The id a key was made with."""
    return IDS_PAD - 1 - keys.to(tl.int32)


@triton.jit
def _key_value(keys):
    """The fp32 value a key was made with."""
    ordered = (keys >> 32).to(tl.int32)
    return tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(tl.float32, bitcast=True)


@triton.jit
def route_kernel(
    logits_ptr,  # [T, E] any float dtype, row-major
    selection_bias_ptr,  # [E] float32, added to the scores for selection only (read if HAS_SELECTION_BIAS)
    weights_ptr,  # out [T, TOP_K + NUM_SHARED] float32
    ids_ptr,  # out [T, TOP_K + NUM_SHARED] int32
    NUM_TOKENS: tl.constexpr,
    NUM_EXPERTS: tl.constexpr,
    EXPERTS_PAD: tl.constexpr,  # power of two >= NUM_EXPERTS
    TOP_K: tl.constexpr,
    TOP_K_PAD: tl.constexpr,  # power of two >= TOP_K
    SCORING: tl.constexpr,  # "softmax" or "sigmoid"
    HAS_SELECTION_BIAS: tl.constexpr,
    NUM_GROUPS: tl.constexpr,  # experts form NUM_GROUPS equal groups of consecutive ids
    GROUPS_PAD: tl.constexpr,  # power of two >= NUM_GROUPS
    TOP_GROUPS: tl.constexpr,  # groups a token may choose its experts from
    RENORMALIZE: tl.constexpr,
    SCALING_FACTOR: tl.constexpr,
    NUM_SHARED: tl.constexpr,  # shared experts, appended to every token's choices
    SHARED_PAD: tl.constexpr,  # power of two >= NUM_SHARED
    BLOCK_T: tl.constexpr,
):
    """Top-k routing: softmax (Mixtral, Qwen, gpt-oss) or sigmoid scores with a selection bias and
    group-limited choice (DeepSeek-V3).

    Grid: ``(cdiv(T, BLOCK_T),)``. Program ``p`` handles tokens ``[p * BLOCK_T, (p + 1) * BLOCK_T)``.
    For each token it

    * scores every expert in fp32: the softmax over all ``E`` logits, or their sigmoids;
    * ranks the experts on their scores, plus the selection bias if any (without bias or groups, on
      the logits themselves: the same order, independent of how ``exp`` rounds);
    * with ``NUM_GROUPS > 1`` scores each group by the sum of its two best ranking values and keeps
      only the experts of the ``TOP_GROUPS`` best groups;
    * picks the ``TOP_K`` best experts left (ties go to the lower index, like ``jax.lax.top_k``) and
      writes their unbiased scores, divided by their sum when ``RENORMALIZE``, times
      ``SCALING_FACTOR``, with their expert ids;
    * appends the ``NUM_SHARED`` shared experts as slots ``TOP_K ..``: ids ``E + s``, weight 1
      (what the expert kernels take; written here, they cost no launch of their own).

    Every pick is one max reduction over int64 keys that pack a value with its id
    (``_ranking_keys``): the latency of one token's ~30 dependent picks (DeepSeek-V3) is what
    routing costs at decode sizes. The picks are loops, not unrolled: the host's cost per launch
    grows with the kernel's code (``backend_triton``), and unrolled picks would make routing the
    largest kernel.
    """
    _route_tokens(
        tokens=tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T), logits_ptr=logits_ptr,
        selection_bias_ptr=selection_bias_ptr, weights_ptr=weights_ptr, ids_ptr=ids_ptr,
        NUM_TOKENS=NUM_TOKENS, NUM_EXPERTS=NUM_EXPERTS, EXPERTS_PAD=EXPERTS_PAD, TOP_K=TOP_K,
        TOP_K_PAD=TOP_K_PAD, SCORING=SCORING, HAS_SELECTION_BIAS=HAS_SELECTION_BIAS, NUM_GROUPS=NUM_GROUPS,
        GROUPS_PAD=GROUPS_PAD, TOP_GROUPS=TOP_GROUPS, RENORMALIZE=RENORMALIZE, SCALING_FACTOR=SCALING_FACTOR,
        NUM_SHARED=NUM_SHARED, SHARED_PAD=SHARED_PAD, BLOCK_T=BLOCK_T,
    )


@triton.jit
def _route_tokens(
    tokens, logits_ptr, selection_bias_ptr, weights_ptr, ids_ptr, NUM_TOKENS: tl.constexpr,
    NUM_EXPERTS: tl.constexpr, EXPERTS_PAD: tl.constexpr, TOP_K: tl.constexpr, TOP_K_PAD: tl.constexpr,
    SCORING: tl.constexpr, HAS_SELECTION_BIAS: tl.constexpr, NUM_GROUPS: tl.constexpr, GROUPS_PAD: tl.constexpr,
    TOP_GROUPS: tl.constexpr, RENORMALIZE: tl.constexpr, SCALING_FACTOR: tl.constexpr, NUM_SHARED: tl.constexpr,
    SHARED_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """``route_kernel``'s work for the ``BLOCK_T`` token indices ``tokens`` (those past
    ``NUM_TOKENS`` are skipped)."""
    experts = tl.arange(0, EXPERTS_PAD)
    slots = tl.arange(0, TOP_K_PAD)
    token_ok = tokens < NUM_TOKENS
    available = token_ok[:, None] & (experts < NUM_EXPERTS)[None, :]
    logits = tl.load(
        logits_ptr + tokens.to(tl.int64)[:, None] * NUM_EXPERTS + experts[None, :],
        mask=available,
        other=-float("inf"),
    ).to(tl.float32)

    if SCORING == "softmax":
        exps = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        scores = exps / tl.sum(exps, axis=1)[:, None]
    else:
        scores = tl.sigmoid(logits)
    # Ranking on the logits orders experts as their scores do, without depending on how exp
    # rounds; group scores add values, and a bias adds to scores, so those rank on the scores.
    ranking = logits
    if NUM_GROUPS > 1:
        ranking = scores
    if HAS_SELECTION_BIAS:
        bias = tl.load(selection_bias_ptr + experts, mask=experts < NUM_EXPERTS, other=0.0)
        ranking = scores + bias[None, :]

    keys = tl.where(available, _ranking_keys(ranking, experts[None, :], EXPERTS_PAD), NO_KEY)

    if NUM_GROUPS > 1:
        # Group scores live beside the experts, each expert holding its group's: everything stays
        # in the [BLOCK_T, EXPERTS_PAD] layout, with no layout conversions between the steps.
        group_size: tl.constexpr = NUM_EXPERTS // NUM_GROUPS
        group_of = (experts // group_size)[None, :]
        group_scores = tl.zeros([BLOCK_T, EXPERTS_PAD], dtype=tl.float32)
        for group in range(NUM_GROUPS):
            member_keys = tl.where(group_of == group, keys, NO_KEY)
            best = tl.max(member_keys, axis=1)
            group_score = _key_value(best)
            if group_size > 1:
                group_score += _key_value(tl.max(tl.where(member_keys == best[:, None], NO_KEY, member_keys), axis=1))
            group_scores = tl.where(group_of == group, group_score[:, None], group_scores)
        group_keys = tl.where(available, _ranking_keys(group_scores, group_of, GROUPS_PAD), NO_KEY)
        kept = tl.zeros([BLOCK_T, EXPERTS_PAD], dtype=tl.int1)
        for _ in range(TOP_GROUPS):
            chosen_group = group_of == _key_id(tl.max(group_keys, axis=1), GROUPS_PAD)[:, None]
            kept = kept | chosen_group
            group_keys = tl.where(chosen_group, NO_KEY, group_keys)
        keys = tl.where(kept, keys, NO_KEY)

    chosen_ids = tl.zeros([BLOCK_T, TOP_K_PAD], dtype=tl.int32)
    for slot in range(TOP_K):
        choice = _key_id(tl.max(keys, axis=1), EXPERTS_PAD)
        chosen_ids = tl.where(slots[None, :] == slot, choice[:, None], chosen_ids)
        keys = tl.where(experts[None, :] == choice[:, None], NO_KEY, keys)
    chosen_scores = tl.where(slots[None, :] < TOP_K, tl.gather(scores, chosen_ids, 1), 0.0)

    if RENORMALIZE:
        chosen_scores = chosen_scores / tl.sum(chosen_scores, axis=1)[:, None]
    slots_per_token: tl.constexpr = TOP_K + NUM_SHARED
    out_offsets = tokens.to(tl.int64)[:, None] * slots_per_token + slots[None, :]
    out_mask = token_ok[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + out_offsets, chosen_scores * SCALING_FACTOR, mask=out_mask)
    tl.store(ids_ptr + out_offsets, chosen_ids, mask=out_mask)
    if NUM_SHARED > 0:
        shared = tl.arange(0, SHARED_PAD)[None, :]
        shared_offsets = tokens.to(tl.int64)[:, None] * slots_per_token + TOP_K + shared
        shared_mask = token_ok[:, None] & (shared < NUM_SHARED)
        tl.store(weights_ptr + shared_offsets, tl.full([BLOCK_T, SHARED_PAD], 1.0, tl.float32), mask=shared_mask)
        tl.store(ids_ptr + shared_offsets, tl.broadcast_to(NUM_EXPERTS + shared, [BLOCK_T, SHARED_PAD]), mask=shared_mask)


@triton.jit
def _id_histogram(expert_ids_ptr, start, end, EXPERTS_PAD: tl.constexpr, HIST_BLOCK: tl.constexpr):
    """How many of the expert ids ``[start, min(start + HIST_BLOCK, end))`` name each expert
    (negative ids, absent pairs, count for none)."""
    pairs = start + tl.arange(0, HIST_BLOCK)
    in_range = pairs < end
    ids = tl.load(expert_ids_ptr + pairs, mask=in_range, other=0)
    return tl.histogram(ids, EXPERTS_PAD, mask=in_range & (ids >= 0))


@triton.jit
def dispatch_kernel(
    expert_ids_ptr,  # [NUM_PAIRS] int32, pair p = token * TOP_K + slot
    sorted_pairs_ptr,  # out [MAX_BLOCKS * BLOCK_M] int32: the pair of each row, NUM_PAIRS = padding
    block_expert_ptr,  # out [MAX_BLOCKS] int32: expert of each row block, -1 = unused block
    expert_row_end_ptr,  # out [EXPERTS_PAD] int32: end of each expert's (padded) rows
    NUM_PAIRS: tl.constexpr,
    EXPERTS_PAD: tl.constexpr,  # next power of two >= E
    BLOCK_M: tl.constexpr,
    MAX_BLOCKS: tl.constexpr,
    CHUNK: tl.constexpr,  # pairs placed per program (a multiple of RANK_BLOCK)
    RANK_BLOCK: tl.constexpr,  # pairs ranked at once (a power of two)
    BLOCKS_PER_STEP: tl.constexpr,  # row blocks described per step (a power of two)
    NUM_PROGRAMS: tl.constexpr,  # >= cdiv(NUM_PAIRS, CHUNK)
    HIST_BLOCK: tl.constexpr,  # expert ids histogrammed per step (a power of two)
):
    """Sorts the (token, slot) pairs by expert, padding each expert's rows to ``BLOCK_M``.

    A negative expert id marks an *absent* pair: one this launch skips (under expert parallelism,
    a pair of another device's experts, the ids being local: ``[0, E_local)``). Absent pairs get no
    row and count for no expert; every other output is as if they were not there.

    Grid: ``(NUM_PROGRAMS,)``, with no communication between programs: each one histograms all
    ``NUM_PAIRS`` expert ids itself, ``HIST_BLOCK`` at a time (it costs no host sync and no second
    launch, but it is the kernel's main cost: the pipeline keeps the programs few). Program ``p``

    * places its own ``CHUNK`` pairs ``[p * CHUNK, (p + 1) * CHUNK)`` (none when that lies past
      the pairs), ``RANK_BLOCK`` at a time: the row of a pair is its expert's padded segment
      start, plus the pairs of that expert earlier in the sequence (from the histogram of the
      earlier chunks, the rank blocks before its own, and a comparison within that one). The
      order is therefore stable (by pair index within an expert);
    * describes its grid-stride share of the row blocks, ``BLOCKS_PER_STEP`` at a time: writes
      each block's expert (-1 past the last segment) and marks the block's rows that hold no pair
      (a segment's padding, every row of an unused block) with the sentinel ``NUM_PAIRS``;
    * program 0 also writes where each expert's rows end (the start is the previous expert's end).

    Every row and every block is written by exactly one program. Small layers get more programs
    than chunks of pairs, so that describing the blocks is spread over the chip too.
    """
    _dispatch_program(
        pid=tl.program_id(0), expert_ids_ptr=expert_ids_ptr, sorted_pairs_ptr=sorted_pairs_ptr,
        block_expert_ptr=block_expert_ptr, expert_row_end_ptr=expert_row_end_ptr, NUM_PAIRS=NUM_PAIRS,
        EXPERTS_PAD=EXPERTS_PAD, BLOCK_M=BLOCK_M, MAX_BLOCKS=MAX_BLOCKS, CHUNK=CHUNK, RANK_BLOCK=RANK_BLOCK,
        BLOCKS_PER_STEP=BLOCKS_PER_STEP, NUM_PROGRAMS=NUM_PROGRAMS, HIST_BLOCK=HIST_BLOCK,
    )


@triton.jit
def _dispatch_program(
    pid, expert_ids_ptr, sorted_pairs_ptr, block_expert_ptr, expert_row_end_ptr, NUM_PAIRS: tl.constexpr,
    EXPERTS_PAD: tl.constexpr, BLOCK_M: tl.constexpr, MAX_BLOCKS: tl.constexpr, CHUNK: tl.constexpr,
    RANK_BLOCK: tl.constexpr, BLOCKS_PER_STEP: tl.constexpr, NUM_PROGRAMS: tl.constexpr, HIST_BLOCK: tl.constexpr,
):
    """``dispatch_kernel``'s work for program ``pid``."""
    experts = tl.arange(0, EXPERTS_PAD)
    my_start = pid * CHUNK

    # One histogram per step; only the step that holds this program's first pair takes two.
    my_step = tl.minimum(my_start, NUM_PAIRS) // HIST_BLOCK * HIST_BLOCK
    counts = tl.zeros([EXPERTS_PAD], dtype=tl.int32)
    for start in range(0, my_step, HIST_BLOCK):
        counts += _id_histogram(
            expert_ids_ptr=expert_ids_ptr, start=start, end=NUM_PAIRS, EXPERTS_PAD=EXPERTS_PAD,
            HIST_BLOCK=HIST_BLOCK,
        )
    before_me = counts + _id_histogram(
        expert_ids_ptr=expert_ids_ptr, start=my_step, end=tl.minimum(my_start, NUM_PAIRS),
        EXPERTS_PAD=EXPERTS_PAD, HIST_BLOCK=HIST_BLOCK,
    )
    counts += _id_histogram(
        expert_ids_ptr=expert_ids_ptr, start=my_step, end=NUM_PAIRS, EXPERTS_PAD=EXPERTS_PAD,
        HIST_BLOCK=HIST_BLOCK,
    )
    for start in range(my_step + HIST_BLOCK, NUM_PAIRS, HIST_BLOCK):
        counts += _id_histogram(
            expert_ids_ptr=expert_ids_ptr, start=start, end=NUM_PAIRS, EXPERTS_PAD=EXPERTS_PAD,
            HIST_BLOCK=HIST_BLOCK,
        )

    padded = tl.cdiv(counts, BLOCK_M) * BLOCK_M
    segment_end = tl.cumsum(padded, axis=0)
    segment_start = segment_end - padded
    rows_in_use = tl.sum(padded, axis=0)
    if pid == 0:
        tl.store(expert_row_end_ptr + experts, segment_end)

    rank_lanes = tl.arange(0, RANK_BLOCK)
    next_row = segment_start + before_me  # of each expert, for its next pair in this chunk
    for rank_start in range(my_start, tl.minimum(my_start + CHUNK, NUM_PAIRS), RANK_BLOCK):
        pairs = rank_start + rank_lanes
        in_range = pairs < NUM_PAIRS
        ids = tl.load(expert_ids_ptr + pairs, mask=in_range, other=0)
        present = in_range & (ids >= 0)
        # An absent pair's (negative) id equals no present pair's: their ranks don't count it.
        same_expert_earlier = (ids[:, None] == ids[None, :]) & (rank_lanes[None, :] < rank_lanes[:, None])
        rank = tl.sum(same_expert_earlier.to(tl.int32), axis=1)
        row = tl.gather(next_row, tl.maximum(ids, 0), 0) + rank
        tl.store(sorted_pairs_ptr + row, pairs, mask=present)
        next_row += tl.histogram(ids, EXPERTS_PAD, mask=present)

    block_lanes = tl.arange(0, BLOCKS_PER_STEP)
    for block_start in range(pid * BLOCKS_PER_STEP, MAX_BLOCKS, NUM_PROGRAMS * BLOCKS_PER_STEP):
        blocks = block_start + block_lanes
        first_rows = blocks * BLOCK_M
        # Segments are padded to whole blocks: a block's segment is the first ending beyond it.
        owner = tl.sum((first_rows[:, None] >= segment_end[None, :]).to(tl.int32), axis=1)
        in_use = first_rows < rows_in_use
        tl.store(block_expert_ptr + blocks, tl.where(in_use, owner, -1), mask=blocks < MAX_BLOCKS)
        # Past the last segment owner is EXPERTS_PAD: clamped, its real end lies below every row.
        real_end = tl.gather(segment_start + counts, tl.minimum(owner, EXPERTS_PAD - 1), 0)
        rows = first_rows[:, None] + tl.arange(0, BLOCK_M)[None, :]
        tl.store(
            sorted_pairs_ptr + rows,
            tl.full([BLOCKS_PER_STEP, BLOCK_M], NUM_PAIRS, tl.int32),
            mask=(blocks < MAX_BLOCKS)[:, None] & (rows >= real_end[:, None]),
        )


@triton.jit
def route_dispatch_kernel(
    logits_ptr,  # [T, E] any float dtype, row-major
    selection_bias_ptr,  # [E] float32 (read if HAS_SELECTION_BIAS)
    weights_ptr,  # out [T, TOP_K + NUM_SHARED] float32
    ids_ptr,  # out [T, TOP_K + NUM_SHARED] int32, read back as the pairs' expert ids
    sorted_pairs_ptr,  # out [MAX_BLOCKS * BLOCK_M] int32
    block_expert_ptr,  # out [MAX_BLOCKS] int32
    expert_row_end_ptr,  # out [SLOT_EXPERTS_PAD] int32
    NUM_TOKENS: tl.constexpr,
    NUM_EXPERTS: tl.constexpr,
    EXPERTS_PAD: tl.constexpr,
    TOP_K: tl.constexpr,
    TOP_K_PAD: tl.constexpr,
    SCORING: tl.constexpr,
    HAS_SELECTION_BIAS: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    GROUPS_PAD: tl.constexpr,
    TOP_GROUPS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    SCALING_FACTOR: tl.constexpr,
    NUM_SHARED: tl.constexpr,
    SHARED_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SLOT_EXPERTS_PAD: tl.constexpr,  # power of two >= NUM_EXPERTS + NUM_SHARED
    BLOCK_M: tl.constexpr,
    MAX_BLOCKS: tl.constexpr,
    RANK_BLOCK: tl.constexpr,  # a power of two
    BLOCKS_PER_STEP: tl.constexpr,  # a power of two
    HIST_BLOCK: tl.constexpr,  # a power of two >= NUM_TOKENS * (TOP_K + NUM_SHARED)
):
    """``route_kernel`` and then ``dispatch_kernel`` in one program, for decode sizes: one launch
    (and one gap between launches) fewer. The parameters are theirs; ``SLOT_EXPERTS_PAD`` is
    dispatch's ``EXPERTS_PAD`` (shared experts included).

    Grid: ``(1,)``. The program routes all ``T`` tokens, ``BLOCK_T`` at a time, then (after a
    barrier that makes its stores of the expert ids visible to all its threads) dispatches the
    ``T * (TOP_K + NUM_SHARED)`` pairs as ``dispatch_kernel``'s only program.
    """
    for start in range(0, NUM_TOKENS, BLOCK_T):
        _route_tokens(
            tokens=start + tl.arange(0, BLOCK_T), logits_ptr=logits_ptr,
            selection_bias_ptr=selection_bias_ptr, weights_ptr=weights_ptr, ids_ptr=ids_ptr,
            NUM_TOKENS=NUM_TOKENS, NUM_EXPERTS=NUM_EXPERTS, EXPERTS_PAD=EXPERTS_PAD, TOP_K=TOP_K,
            TOP_K_PAD=TOP_K_PAD, SCORING=SCORING, HAS_SELECTION_BIAS=HAS_SELECTION_BIAS,
            NUM_GROUPS=NUM_GROUPS, GROUPS_PAD=GROUPS_PAD, TOP_GROUPS=TOP_GROUPS, RENORMALIZE=RENORMALIZE,
            SCALING_FACTOR=SCALING_FACTOR, NUM_SHARED=NUM_SHARED, SHARED_PAD=SHARED_PAD, BLOCK_T=BLOCK_T,
        )
    tl.debug_barrier()
    num_pairs: tl.constexpr = NUM_TOKENS * (TOP_K + NUM_SHARED)
    # As the only program it places every pair: its chunk is the whole (HIST_BLOCK-long) list.
    _dispatch_program(
        pid=0, expert_ids_ptr=ids_ptr, sorted_pairs_ptr=sorted_pairs_ptr, block_expert_ptr=block_expert_ptr,
        expert_row_end_ptr=expert_row_end_ptr, NUM_PAIRS=num_pairs, EXPERTS_PAD=SLOT_EXPERTS_PAD,
        BLOCK_M=BLOCK_M, MAX_BLOCKS=MAX_BLOCKS, CHUNK=HIST_BLOCK, RANK_BLOCK=RANK_BLOCK,
        BLOCKS_PER_STEP=BLOCKS_PER_STEP, NUM_PROGRAMS=1, HIST_BLOCK=HIST_BLOCK,
    )


@triton.jit
def _zero_fill(zeros_ptr, NUM_ZEROS: tl.constexpr, ZERO_BLOCK: tl.constexpr):
    """Program ``p`` writes zeros to ``zeros_ptr[p * ZERO_BLOCK : (p + 1) * ZERO_BLOCK]`` (within
    ``NUM_ZEROS``): a grid of at least ``cdiv(NUM_ZEROS, ZERO_BLOCK)`` programs zeroes them all.

    The combine's arrival counters must start at zero. Zeroed by the kernel that runs before it,
    they need no memset of their own: one host launch and one dependent GPU operation fewer per
    layer, which decode sizes feel."""
    if NUM_ZEROS > 0:
        offsets = tl.program_id(0) * ZERO_BLOCK + tl.arange(0, ZERO_BLOCK)
        tl.store(zeros_ptr + offsets, tl.zeros([ZERO_BLOCK], dtype=tl.int32), mask=offsets < NUM_ZEROS)


@triton.jit
def _grouped_tile(tile, NUM_ROW_TILES: tl.constexpr, NUM_COL_TILES: tl.constexpr, GROUP: tl.constexpr):
    """Maps a linear tile index to (row tile, column tile), ``GROUP`` row tiles at a time (the
    Triton matmul tutorial's order): programs running together then share both their row and their
    column operands in L2, instead of sweeping all columns of one row tile at a time.
    """
    tiles_per_group = GROUP * NUM_COL_TILES
    first_row = (tile // tiles_per_group) * GROUP
    group_rows = tl.minimum(NUM_ROW_TILES - first_row, GROUP)
    row = first_row + (tile % tiles_per_group) % group_rows
    col = (tile % tiles_per_group) // group_rows
    return row, col


@triton.jit
def _row_block_tile(
    tile, block_expert_ptr, expert_row_end_ptr, MAX_BLOCKS: tl.constexpr, NUM_COL_TILES: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """(row block, column tile, expert of the block) of one program of a row-block kernel.

    ``GROUP_M > 0``: ``_grouped_tile``'s order, ``GROUP_M`` row blocks at a time, whoever's they
    are. ``GROUP_M == 0``: each expert's row blocks together, however many it has. The tiles of
    an expert whose blocks are ``[start, end)`` are ``[start, end) * NUM_COL_TILES`` in the
    block-by-block order too, so the program finds its expert through the block that order would
    give it, then walks the expert's tiles column by column: the blocks that read the same weight
    tile run at the same time and share it in L2. Where each expert fills one block (decode) that
    is the block-by-block order, which streams each weight matrix in sequence; where a popular
    expert spans several (skewed routing), its weights are read from memory once instead of once
    per block.
    """
    if GROUP_M == 0:
        expert = tl.load(block_expert_ptr + tile // NUM_COL_TILES)
        # Unused blocks (expert -1) lie after every segment: their programs exit, wherever they map.
        end = tl.load(expert_row_end_ptr + tl.maximum(expert, 0)) // BLOCK_M
        start = tl.where(expert > 0, tl.load(expert_row_end_ptr + tl.maximum(expert - 1, 0)), 0) // BLOCK_M
        blocks = tl.maximum(end - start, 1)
        offset = tile - start * NUM_COL_TILES
        block = start + offset % blocks
        col = offset // blocks
    else:
        block, col = _grouped_tile(tile, MAX_BLOCKS, NUM_COL_TILES, GROUP_M)
        expert = tl.load(block_expert_ptr + block)
    return block, col, expert


@triton.jit
def _block_pairs(
    sorted_pairs_ptr, block, NUM_PAIRS: tl.constexpr, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr,
):
    """The first ``ROWS`` rows of one row block, their pairs, which rows are real (not padding),
    and their tokens."""
    rows = block * BLOCK_M + tl.arange(0, ROWS)
    pairs = tl.load(sorted_pairs_ptr + rows)
    return rows.to(tl.int64), pairs, pairs < NUM_PAIRS, (pairs // TOP_K).to(tl.int64)


@triton.jit
def _second_half_is_padding(
    sorted_pairs_ptr, block, NUM_PAIRS: tl.constexpr, BLOCK_M: tl.constexpr, HALF_BLOCKS: tl.constexpr
):
    """Whether the block's second half holds only padding rows (always False without
    ``HALF_BLOCKS``). A block's real rows come first (segments fill their blocks from the start),
    so one row tells."""
    if HALF_BLOCKS:
        return tl.load(sorted_pairs_ptr + block * BLOCK_M + BLOCK_M // 2) == NUM_PAIRS
    else:
        return False


@triton.jit
def _expert_matrix(routed_ptr, shared_ptr, expert, NUM_ROUTED: tl.constexpr, MATRIX_SIZE: tl.constexpr):
    """Start of one expert's weight matrix: routed experts ``[0, NUM_ROUTED)`` live in one array,
    the shared experts numbered after them in another (no concatenated copy of the weights)."""
    if expert < NUM_ROUTED:
        start = routed_ptr + expert.to(tl.int64) * MATRIX_SIZE
    else:
        start = shared_ptr + (expert - NUM_ROUTED).to(tl.int64) * MATRIX_SIZE
    return start


@triton.jit
def _expert_weight(
    routed_ptr, routed_scales_ptr, routed_zeros_ptr, shared_ptr, shared_scales_ptr, shared_zeros_ptr, expert,
    NUM_ROUTED: tl.constexpr, K: tl.constexpr, N: tl.constexpr, W_FORMAT: tl.constexpr,
    SCALE_BLOCK_K: tl.constexpr, SCALE_BLOCK_N: tl.constexpr,
):
    """Starts of one expert's logical [K, N] weight: its values and, where ``W_FORMAT`` is a
    quantized format, its scales and zero points (the pipeline's ``_quantized_weights`` layouts:
    4-bit values two per byte along K, one scale per ``SCALE_BLOCK_K x SCALE_BLOCK_N`` block)."""
    stored_rows: tl.constexpr = K // 2 if (W_FORMAT == "int4") or (W_FORMAT == "mxfp4") else K
    scales_size: tl.constexpr = (K + SCALE_BLOCK_K - 1) // SCALE_BLOCK_K * ((N + SCALE_BLOCK_N - 1) // SCALE_BLOCK_N)
    values = _expert_matrix(
        routed_ptr=routed_ptr, shared_ptr=shared_ptr, expert=expert, NUM_ROUTED=NUM_ROUTED,
        MATRIX_SIZE=stored_rows * N,
    )
    scales = _expert_matrix(
        routed_ptr=routed_scales_ptr, shared_ptr=shared_scales_ptr, expert=expert, NUM_ROUTED=NUM_ROUTED,
        MATRIX_SIZE=scales_size,
    )
    zeros = _expert_matrix(
        routed_ptr=routed_zeros_ptr, shared_ptr=shared_zeros_ptr, expert=expert, NUM_ROUTED=NUM_ROUTED,
        MATRIX_SIZE=scales_size,
    )
    return values, scales, zeros


@triton.jit
def _scale_offsets(w_rows, w_cols, N: tl.constexpr, SCALE_BLOCK_K: tl.constexpr, SCALE_BLOCK_N: tl.constexpr):
    """Offsets of the scales of elements ``(w_rows, w_cols)`` (broadcast against each other) of
    a [K, N] weight, in its row-major ``[cdiv(K, SCALE_BLOCK_K), cdiv(N, SCALE_BLOCK_N)]`` scales."""
    scale_cols: tl.constexpr = (N + SCALE_BLOCK_N - 1) // SCALE_BLOCK_N
    return (w_rows // SCALE_BLOCK_K) * scale_cols + w_cols // SCALE_BLOCK_N


@triton.jit
def _quantized_values(values_ptr, row_start, col_start, K: tl.constexpr, N: tl.constexpr, TILE_K: tl.constexpr,
                      TILE_N: tl.constexpr, W_FORMAT: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """The stored values of the [TILE_K, TILE_N] tile at ``(row_start, col_start)`` of a quantized
    [K, N] weight, decoded but not scaled: fp8 as float8e4nv, the others as fp32 (int4 two's
    complement without zero points, unsigned with them; mxfp4 e2m1); 0 past the weight's edge.
    4-bit values sit two per byte along K, row ``2j`` in byte ``j``'s low nibble: each byte is
    loaded once and its nibbles interleaved into rows."""
    cols = col_start + tl.arange(0, TILE_N)
    if (W_FORMAT == "int4") or (W_FORMAT == "mxfp4"):
        tl.static_assert(TILE_K % 2 == 0, "4-bit tiles hold whole bytes")
        byte_rows = row_start // 2 + tl.arange(0, TILE_K // 2)
        mask = (byte_rows < K // 2)[:, None] & (cols < N)[None, :]
        byte = tl.load(values_ptr + byte_rows[:, None] * N + cols[None, :], mask=mask, other=0).to(tl.int32)
        nibbles = tl.join(byte & 0xF, (byte >> 4) & 0xF)  # [TILE_K // 2, TILE_N, 2]
        code = tl.reshape(tl.permute(nibbles, (0, 2, 1)), (TILE_K, TILE_N))
        if W_FORMAT == "int4":
            if HAS_ZEROS:
                values = code.to(tl.float32)
            else:
                values = (code - ((code >> 3) << 4)).to(tl.float32)
        else:
            # e2m1: sign, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is subnormal (0, 0.5).
            exponent = (code >> 1) & 3
            mantissa = (code & 1).to(tl.float32)
            power = ((exponent + 126) << 23).to(tl.float32, bitcast=True)  # 2 ** (exponent - 1)
            magnitude = tl.where(exponent == 0, 0.5 * mantissa, (1.0 + 0.5 * mantissa) * power)
            values = tl.where(code >= 8, -magnitude, magnitude)
    else:
        rows = row_start + tl.arange(0, TILE_K)
        mask = (rows < K)[:, None] & (cols < N)[None, :]
        raw = tl.load(values_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0)
        if W_FORMAT == "fp8":
            values = raw.to(tl.float8e4nv, bitcast=True)
        else:
            values = raw.to(tl.float32)
    return values


@triton.jit
def _broadcast_block_entries(entries_ptr, row_start, col_start, K: tl.constexpr, N: tl.constexpr,
                             TILE_K: tl.constexpr, TILE_N: tl.constexpr, SCALE_BLOCK_K: tl.constexpr,
                             SCALE_BLOCK_N: tl.constexpr):
    """The per-block entries (scales or zero points, row-major ``[cdiv(K, SCALE_BLOCK_K),
    cdiv(N, SCALE_BLOCK_N)]``) of the [TILE_K, TILE_N] tile at ``(row_start, col_start)``,
    broadcast to the tile. Each entry is loaded once: the tile covers ``TILE_K / SCALE_BLOCK_K``
    (at least 1) blocks along K and ``TILE_N / SCALE_BLOCK_N`` along N (tiles start at multiples
    of their size; the sizes are powers of two or span the weight)."""
    tl.static_assert((TILE_K % SCALE_BLOCK_K == 0) or (SCALE_BLOCK_K % TILE_K == 0), "tiles and blocks nest along K")
    tl.static_assert((TILE_N % SCALE_BLOCK_N == 0) or (SCALE_BLOCK_N % TILE_N == 0), "tiles and blocks nest along N")
    block_rows: tl.constexpr = TILE_K // SCALE_BLOCK_K if SCALE_BLOCK_K < TILE_K else 1
    block_cols: tl.constexpr = TILE_N // SCALE_BLOCK_N if SCALE_BLOCK_N < TILE_N else 1
    rows = row_start // SCALE_BLOCK_K + tl.arange(0, block_rows)
    cols = col_start // SCALE_BLOCK_N + tl.arange(0, block_cols)
    scale_rows: tl.constexpr = (K + SCALE_BLOCK_K - 1) // SCALE_BLOCK_K
    scale_cols: tl.constexpr = (N + SCALE_BLOCK_N - 1) // SCALE_BLOCK_N
    mask = (rows < scale_rows)[:, None] & (cols < scale_cols)[None, :]
    blocks = tl.load(entries_ptr + rows[:, None] * scale_cols + cols[None, :], mask=mask, other=0)
    spread = tl.broadcast_to(
        tl.reshape(blocks, (block_rows, 1, block_cols, 1)),
        (block_rows, TILE_K // block_rows, block_cols, TILE_N // block_cols),
    )
    return tl.reshape(spread, (TILE_K, TILE_N))


@triton.jit
def _dequantized_tile(
    values_ptr, scales_ptr, zeros_ptr, row_start, col_start, K: tl.constexpr, N: tl.constexpr,
    TILE_K: tl.constexpr, TILE_N: tl.constexpr, TRANSPOSE: tl.constexpr, W_FORMAT: tl.constexpr,
    SCALE_BLOCK_K: tl.constexpr, SCALE_BLOCK_N: tl.constexpr, HAS_ZEROS: tl.constexpr, DTYPE: tl.constexpr,
):
    """The [TILE_K, TILE_N] tile at ``(row_start, col_start)`` of one expert's quantized [K, N]
    weight, dequantized in registers to ``DTYPE`` (the activations'): ``(value - zero) * scale``
    in fp32, rounded once; 0 past the weight's edge. With ``TRANSPOSE``, its [TILE_N, TILE_K]
    transpose. Scales (fp32, or e8m0 bytes for mxfp4: the exponent bits of ``2 ** (s - 127)``)
    and zero points come one per block (``_broadcast_block_entries``)."""
    values = _quantized_values(
        values_ptr=values_ptr, row_start=row_start, col_start=col_start, K=K, N=N, TILE_K=TILE_K, TILE_N=TILE_N,
        W_FORMAT=W_FORMAT, HAS_ZEROS=HAS_ZEROS,
    ).to(tl.float32)
    if HAS_ZEROS:
        zeros = _broadcast_block_entries(
            entries_ptr=zeros_ptr, row_start=row_start, col_start=col_start, K=K, N=N, TILE_K=TILE_K,
            TILE_N=TILE_N, SCALE_BLOCK_K=SCALE_BLOCK_K, SCALE_BLOCK_N=SCALE_BLOCK_N,
        ).to(tl.float32)
        # A block spanning the weight's edge lends its zero point to the elements past it too.
        rows = row_start + tl.arange(0, TILE_K)
        cols = col_start + tl.arange(0, TILE_N)
        values = tl.where((rows < K)[:, None] & (cols < N)[None, :], values - zeros, 0.0)
    scales = _broadcast_block_entries(
        entries_ptr=scales_ptr, row_start=row_start, col_start=col_start, K=K, N=N, TILE_K=TILE_K,
        TILE_N=TILE_N, SCALE_BLOCK_K=SCALE_BLOCK_K, SCALE_BLOCK_N=SCALE_BLOCK_N,
    )
    if W_FORMAT == "mxfp4":
        scales = (scales.to(tl.int32) << 23).to(tl.float32, bitcast=True)
    out = (values * scales).to(DTYPE)
    if TRANSPOSE:
        out = tl.trans(out)
    return out


@triton.jit
def _fp8_scaled_dot(
    acc, a, a_scales, w_ptr, w_scales_ptr, k_start, ks, cols, w_mask, N: tl.constexpr,
    SCALE_BLOCK_K: tl.constexpr, SCALE_BLOCK_N: tl.constexpr,
):
    """``acc + (a @ w) * a_scales[:, None] * w_scales``: one K step of an fp8 x fp8 GEMM (w8a8)
    with fp32 accumulation, ``a`` an fp8 activation tile with its rows' scales, ``w`` the
    [BLOCK_K, BLOCK_N] fp8 tile of a row-major [K, N] weight at ``k_start``. The step lies in one
    scale block of both operands along K, so the scales apply to the step's product as a whole."""
    w_rows = (k_start + ks)[:, None]
    w = tl.load(w_ptr + w_rows * N + cols[None, :], mask=w_mask, other=0).to(tl.float8e4nv, bitcast=True)
    w_offsets = _scale_offsets(
        w_rows=k_start, w_cols=cols, N=N, SCALE_BLOCK_K=SCALE_BLOCK_K, SCALE_BLOCK_N=SCALE_BLOCK_N
    )
    w_scales = tl.load(w_scales_ptr + w_offsets, mask=cols < N, other=0.0)
    return acc + tl.dot(a, w, out_dtype=tl.float32) * a_scales[:, None] * w_scales[None, :]


@triton.jit
def _fp8_activations(a_ptrs, a_scales_ptr, a_rows, a_row_ok, k_ok, k_start, K: tl.constexpr,
                     ACT_BLOCK: tl.constexpr):
    """An fp8 activation tile (stored as bytes) and its rows' fp32 scales for the K step at
    ``k_start`` (``ACT_BLOCK`` channels share a scale; the step lies within one block). Rows not
    ``a_row_ok`` read zeros."""
    a = tl.load(a_ptrs, mask=a_row_ok[:, None] & k_ok[None, :], other=0).to(tl.float8e4nv, bitcast=True)
    scale_cols: tl.constexpr = (K + ACT_BLOCK - 1) // ACT_BLOCK
    scales = tl.load(a_scales_ptr + a_rows * scale_cols + k_start // ACT_BLOCK, mask=a_row_ok, other=0.0)
    return a, scales


@triton.jit
def _expert_bias(bias_ptr, expert, cols, col_ok, NUM_ROUTED: tl.constexpr, N: tl.constexpr):
    """[1, BLOCK_N] fp32 slice of a routed expert's [E, N] bias; shared experts have none (their
    ids are clamped to a real row for the load, whose values are then dropped)."""
    row = tl.minimum(expert, NUM_ROUTED - 1).to(tl.int64)
    bias = tl.load(bias_ptr + row * N + cols, mask=col_ok, other=0.0).to(tl.float32)
    return tl.where(expert < NUM_ROUTED, bias, 0.0)[None, :]


@triton.jit
def _swiglu(gate, up, ACTIVATION: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr):
    """The gated activation and its partial derivatives with respect to gate and up.

    ``"silu"``: ``silu(gate) * up``. ``"clamped_swiglu"`` (gpt-oss): with ``g = min(gate, LIMIT)``
    and ``u = clip(up, -LIMIT, LIMIT)``, ``g * sigmoid(ALPHA * g) * (u + 1)``; the clamps pass no
    gradient where they bind.
    """
    if ACTIVATION == "clamped_swiglu":
        g = tl.minimum(gate, LIMIT)
        u = tl.minimum(tl.maximum(up, -LIMIT), LIMIT) + 1.0
        sig = tl.sigmoid(ALPHA * g)
        glu = g * sig
        d_gate = tl.where(gate <= LIMIT, u * sig * (1.0 + ALPHA * g * (1.0 - sig)), 0.0)
        d_up = tl.where((up >= -LIMIT) & (up <= LIMIT), glu, 0.0)
    else:
        u = up
        sig = tl.sigmoid(gate)
        glu = gate * sig
        d_gate = u * sig * (1.0 + gate * (1.0 - sig))
        d_up = glu
    return glu * u, d_gate, d_up


@triton.jit
def _weight_tiles(w_ptr, K: tl.constexpr, N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """A tensor descriptor of one expert's row-major [K, N] weight matrix, read in
    [BLOCK_K, BLOCK_N] tiles through Hopper's tensor memory accelerator (TMA): one copy instruction
    per tile, no address arithmetic or masks in the program, zeros past the matrix's edges.

    Made on the device, so it needs Triton's global scratch, which jax-triton >= 0.4 with jaxlib
    >= 0.11.1 provides, and ``w_ptr`` and rows of ``N`` elements 16-byte aligned: the pipeline
    turns ``USE_TMA`` on only where both hold (``pipeline._use_tma``)."""
    return tl.make_tensor_descriptor(w_ptr, shape=[K, N], strides=[N, 1], block_shape=[BLOCK_K, BLOCK_N])


@triton.jit
def _gathered_dual_gemm(
    x_ptr, x_scales_ptr, tokens, is_real, w1_ptr, w1_scales_ptr, w1_zeros_ptr, w2_ptr, w2_scales_ptr, w2_zeros_ptr,
    col_start, cols, col_ok,
    K: tl.constexpr, N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, W_FORMAT: tl.constexpr,
    SCALE_BLOCK_K: tl.constexpr, SCALE_BLOCK_N: tl.constexpr, HAS_ZEROS: tl.constexpr, ACT_FP8: tl.constexpr,
    ACT_BLOCK: tl.constexpr,
):
    """``x[tokens] @ w1`` and ``x[tokens] @ w2`` for row-major [K, N] weights (already offset to
    the expert), loading each [BLOCK_M, BLOCK_K] activation tile once for both; the weight tiles
    of columns ``cols`` (from ``col_start``) through pointers or, with ``USE_TMA``, descriptors.

    Quantized weights (``W_FORMAT`` other than ``"none"``; never with TMA): each tile is
    dequantized in registers (``_dequantized_tile``) before the same dot; with ``ACT_FP8`` (w8a8)
    ``x`` holds fp8 bytes with their per-row scales ``x_scales`` and the dots are fp8 x fp8
    (``_fp8_scaled_dot``)."""
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * K + ks[None, :]
    w_offsets = ks[:, None] * N + cols[None, :]
    if USE_TMA:
        w1_tiles = _weight_tiles(w_ptr=w1_ptr, K=K, N=N, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N)
        w2_tiles = _weight_tiles(w_ptr=w2_ptr, K=K, N=N, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_ok = ks < K - k_start
        x_mask = is_real[:, None] & k_ok[None, :]
        if ACT_FP8:
            x, x_scales = _fp8_activations(
                a_ptrs=x_ptrs, a_scales_ptr=x_scales_ptr, a_rows=tokens, a_row_ok=is_real, k_ok=k_ok,
                k_start=k_start, K=K, ACT_BLOCK=ACT_BLOCK,
            )
            w_mask = k_ok[:, None] & col_ok[None, :]
            acc1 = _fp8_scaled_dot(
                acc1, x, x_scales, w_ptr=w1_ptr, w_scales_ptr=w1_scales_ptr, k_start=k_start, ks=ks, cols=cols,
                w_mask=w_mask, N=N, SCALE_BLOCK_K=SCALE_BLOCK_K, SCALE_BLOCK_N=SCALE_BLOCK_N,
            )
            acc2 = _fp8_scaled_dot(
                acc2, x, x_scales, w_ptr=w2_ptr, w_scales_ptr=w2_scales_ptr, k_start=k_start, ks=ks, cols=cols,
                w_mask=w_mask, N=N, SCALE_BLOCK_K=SCALE_BLOCK_K, SCALE_BLOCK_N=SCALE_BLOCK_N,
            )
        else:
            x = tl.load(x_ptrs, mask=x_mask, other=0.0)
            if W_FORMAT != "none":
                w1 = _dequantized_tile(
                    values_ptr=w1_ptr, scales_ptr=w1_scales_ptr, zeros_ptr=w1_zeros_ptr, row_start=k_start,
                    col_start=col_start, K=K, N=N, TILE_K=BLOCK_K, TILE_N=BLOCK_N, TRANSPOSE=False,
                    W_FORMAT=W_FORMAT, SCALE_BLOCK_K=SCALE_BLOCK_K, SCALE_BLOCK_N=SCALE_BLOCK_N, HAS_ZEROS=HAS_ZEROS,
                    DTYPE=x.dtype,
                )
                w2 = _dequantized_tile(
                    values_ptr=w2_ptr, scales_ptr=w2_scales_ptr, zeros_ptr=w2_zeros_ptr, row_start=k_start,
                    col_start=col_start, K=K, N=N, TILE_K=BLOCK_K, TILE_N=BLOCK_N, TRANSPOSE=False,
                    W_FORMAT=W_FORMAT, SCALE_BLOCK_K=SCALE_BLOCK_K, SCALE_BLOCK_N=SCALE_BLOCK_N, HAS_ZEROS=HAS_ZEROS,
                    DTYPE=x.dtype,
                )
            elif USE_TMA:
                w1 = w1_tiles.load([k_start, col_start])
                w2 = w2_tiles.load([k_start, col_start])
            else:
                w_mask = k_ok[:, None] & col_ok[None, :]
                w1 = tl.load(w1_ptr + w_offsets, mask=w_mask, other=0.0)
                w2 = tl.load(w2_ptr + w_offsets, mask=w_mask, other=0.0)
            acc1 = tl.dot(x, w1, acc1, input_precision=DOT_PRECISION)
            acc2 = tl.dot(x, w2, acc2, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_offsets += BLOCK_K * N
    return acc1, acc2


@triton.jit
def _gathered_gemm(
    acc, a_ptr, a_scales_ptr, a_rows, a_row_ok, b_ptr, b_scales_ptr, b_zeros_ptr, col_start, cols, col_ok,
    K: tl.constexpr, N: tl.constexpr, B_TRANSPOSED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    W_FORMAT: tl.constexpr, SCALE_BLOCK_K: tl.constexpr, SCALE_BLOCK_N: tl.constexpr, HAS_ZEROS: tl.constexpr,
    ACT_FP8: tl.constexpr, ACT_BLOCK: tl.constexpr,
):
    """``acc + a[a_rows] @ b`` for row-major ``a`` with K columns and a [K, N] ``b`` (already
    offset to the expert): a row-major weight, or with ``B_TRANSPOSED`` the transpose of a
    row-major [N, K] one (other strides). ``USE_TMA`` (row-major ``b`` only) reads ``b``'s tiles
    through a descriptor. Quantized and fp8 paths as in ``_gathered_dual_gemm`` (a transposed
    weight dequantized only: w8a8 runs the forward GEMMs, whose weights are row-major)."""
    stride_bk: tl.constexpr = 1 if B_TRANSPOSED else N
    stride_bn: tl.constexpr = K if B_TRANSPOSED else 1
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * K + ks[None, :]
    b_ptrs = b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    if USE_TMA:
        tl.static_assert(not B_TRANSPOSED, "TMA weight tiles need a row-major weight")
        b_tiles = _weight_tiles(w_ptr=b_ptr, K=K, N=N, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N)
    for k_start in range(0, K, BLOCK_K):
        k_ok = ks < K - k_start
        a_mask = a_row_ok[:, None] & k_ok[None, :]
        b_mask = k_ok[:, None] & col_ok[None, :]
        if ACT_FP8:
            tl.static_assert(not B_TRANSPOSED, "fp8 activations take row-major weights")
            a, a_scales = _fp8_activations(
                a_ptrs=a_ptrs, a_scales_ptr=a_scales_ptr, a_rows=a_rows, a_row_ok=a_row_ok, k_ok=k_ok,
                k_start=k_start, K=K, ACT_BLOCK=ACT_BLOCK,
            )
            acc = _fp8_scaled_dot(
                acc, a, a_scales, w_ptr=b_ptr, w_scales_ptr=b_scales_ptr, k_start=k_start, ks=ks, cols=cols,
                w_mask=b_mask, N=N, SCALE_BLOCK_K=SCALE_BLOCK_K, SCALE_BLOCK_N=SCALE_BLOCK_N,
            )
        else:
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            if W_FORMAT != "none":
                # A transposed weight is stored [N, K]: its tile at (col_start, k_start), transposed.
                b = _dequantized_tile(
                    values_ptr=b_ptr, scales_ptr=b_scales_ptr, zeros_ptr=b_zeros_ptr,
                    row_start=col_start if B_TRANSPOSED else k_start, col_start=k_start if B_TRANSPOSED else col_start,
                    K=N if B_TRANSPOSED else K, N=K if B_TRANSPOSED else N,
                    TILE_K=BLOCK_N if B_TRANSPOSED else BLOCK_K, TILE_N=BLOCK_K if B_TRANSPOSED else BLOCK_N,
                    TRANSPOSE=B_TRANSPOSED, W_FORMAT=W_FORMAT, SCALE_BLOCK_K=SCALE_BLOCK_K,
                    SCALE_BLOCK_N=SCALE_BLOCK_N, HAS_ZEROS=HAS_ZEROS, DTYPE=a.dtype,
                )
            elif USE_TMA:
                b = b_tiles.load([k_start, col_start])
            else:
                b = tl.load(b_ptrs, mask=b_mask, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _gate_up_preactivations(
    x_ptr, tokens, is_real, w_gate_ptr, w_up_ptr, shared_w_gate_ptr, shared_w_up_ptr,
    gate_bias_ptr, up_bias_ptr, expert, col_start, cols, col_ok, x_scales_ptr, w_gate_scales_ptr, w_gate_zeros_ptr,
    w_up_scales_ptr, w_up_zeros_ptr, shared_w_gate_scales_ptr,
    shared_w_gate_zeros_ptr, shared_w_up_scales_ptr, shared_w_up_zeros_ptr,
    NUM_ROUTED: tl.constexpr, HIDDEN: tl.constexpr, INTERMEDIATE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_TMA: tl.constexpr, W_FORMAT: tl.constexpr, SCALE_BLOCK_K: tl.constexpr, SCALE_BLOCK_N: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    ACT_FP8: tl.constexpr, ACT_BLOCK: tl.constexpr,
):
    """fp32 ``x[tokens] @ w_gate[e] (+ gate_bias[e])`` and the same for up, for one row block and
    column tile: what the forward computes and the backward recomputes. Quantized weights come
    with their scales and zero points, fp8 activations with their scales (``_gathered_dual_gemm``)."""
    w_gate, w_gate_scales, w_gate_zeros = _expert_weight(
        routed_ptr=w_gate_ptr, routed_scales_ptr=w_gate_scales_ptr, routed_zeros_ptr=w_gate_zeros_ptr,
        shared_ptr=shared_w_gate_ptr, shared_scales_ptr=shared_w_gate_scales_ptr,
        shared_zeros_ptr=shared_w_gate_zeros_ptr, expert=expert, NUM_ROUTED=NUM_ROUTED, K=HIDDEN, N=INTERMEDIATE,
        W_FORMAT=W_FORMAT, SCALE_BLOCK_K=SCALE_BLOCK_K, SCALE_BLOCK_N=SCALE_BLOCK_N,
    )
    w_up, w_up_scales, w_up_zeros = _expert_weight(
        routed_ptr=w_up_ptr, routed_scales_ptr=w_up_scales_ptr, routed_zeros_ptr=w_up_zeros_ptr,
        shared_ptr=shared_w_up_ptr, shared_scales_ptr=shared_w_up_scales_ptr, shared_zeros_ptr=shared_w_up_zeros_ptr,
        expert=expert, NUM_ROUTED=NUM_ROUTED, K=HIDDEN, N=INTERMEDIATE, W_FORMAT=W_FORMAT,
        SCALE_BLOCK_K=SCALE_BLOCK_K, SCALE_BLOCK_N=SCALE_BLOCK_N,
    )
    gate, up = _gathered_dual_gemm(
        x_ptr, x_scales_ptr, tokens, is_real, w1_ptr=w_gate, w1_scales_ptr=w_gate_scales, w1_zeros_ptr=w_gate_zeros,
        w2_ptr=w_up, w2_scales_ptr=w_up_scales, w2_zeros_ptr=w_up_zeros, col_start=col_start, cols=cols,
        col_ok=col_ok, K=HIDDEN, N=INTERMEDIATE, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        DOT_PRECISION=DOT_PRECISION, USE_TMA=USE_TMA, W_FORMAT=W_FORMAT, SCALE_BLOCK_K=SCALE_BLOCK_K,
        SCALE_BLOCK_N=SCALE_BLOCK_N, HAS_ZEROS=HAS_ZEROS,
        ACT_FP8=ACT_FP8, ACT_BLOCK=ACT_BLOCK,
    )
    if HAS_BIAS:
        gate += _expert_bias(
            bias_ptr=gate_bias_ptr, expert=expert, cols=cols, col_ok=col_ok, NUM_ROUTED=NUM_ROUTED,
            N=INTERMEDIATE,
        )
        up += _expert_bias(
            bias_ptr=up_bias_ptr, expert=expert, cols=cols, col_ok=col_ok, NUM_ROUTED=NUM_ROUTED,
            N=INTERMEDIATE,
        )
    return gate, up


@triton.jit
def gate_up_kernel(
    x_ptr,  # [T, H] activations, row-major
    w_gate_ptr,  # [E, H, F] row-major
    w_up_ptr,  # [E, H, F] row-major
    shared_w_gate_ptr,  # [S, H, F] row-major, the shared experts E .. E + S - 1
    shared_w_up_ptr,  # [S, H, F] row-major
    gate_bias_ptr,  # [E, F] (read only if HAS_BIAS)
    up_bias_ptr,  # [E, F] (read only if HAS_BIAS)
    sorted_pairs_ptr,  # [MAX_BLOCKS * BLOCK_M] int32, from dispatch_kernel
    block_expert_ptr,  # [MAX_BLOCKS] int32, from dispatch_kernel
    expert_row_end_ptr,  # [EXPERTS_PAD] int32, from dispatch_kernel (read only if GROUP_M == 0)
    x_scales_ptr,  # [T, cdiv(H, ACT_BLOCK)] float32 scales of fp8 x (read only if ACT_FP8; x is then fp8 bytes)
    w_gate_scales_ptr,  # [E, cdiv(H, SCALE_BLOCK_K), cdiv(F, SCALE_BLOCK_N)] (read only if quantized)
    w_gate_zeros_ptr,  # like w_gate_scales_ptr, zero points (read only if HAS_ZEROS)
    w_up_scales_ptr,  # like w_gate_scales_ptr
    w_up_zeros_ptr,  # like w_gate_zeros_ptr
    shared_w_gate_scales_ptr,  # [S, ...] the same for the shared experts
    shared_w_gate_zeros_ptr,
    shared_w_up_scales_ptr,
    shared_w_up_zeros_ptr,
    act_ptr,  # out [MAX_BLOCKS * BLOCK_M, F] in the activation dtype: the gated activation
    gate_preact_ptr,  # out [MAX_BLOCKS * BLOCK_M, F] x @ gate (+ bias), written only if SAVE_PREACTIVATIONS
    up_preact_ptr,  # out [MAX_BLOCKS * BLOCK_M, F] x @ up (+ bias), written only if SAVE_PREACTIVATIONS
    zeros_ptr,  # out [NUM_ZEROS] int32: zeros, the down projection's arrival counters (_zero_fill)
    NUM_PAIRS: tl.constexpr,
    TOP_K: tl.constexpr,
    NUM_ROUTED: tl.constexpr,
    HIDDEN: tl.constexpr,
    INTERMEDIATE: tl.constexpr,
    MAX_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ALPHA: tl.constexpr,
    LIMIT: tl.constexpr,
    SAVE_PREACTIVATIONS: tl.constexpr,
    HALF_BLOCKS: tl.constexpr,  # compute only the first half of blocks whose second half is padding
    NUM_ZEROS: tl.constexpr,
    ZERO_BLOCK: tl.constexpr,
    USE_TMA: tl.constexpr,  # read the weight tiles through TMA descriptors (_weight_tiles)
    W_FORMAT: tl.constexpr,  # "none" (float weights) or the quantized format: "fp8", "int8", "int4", "mxfp4"
    SCALE_BLOCK_K: tl.constexpr,  # rows of K sharing a scale (at least K: one for the whole K)
    SCALE_BLOCK_N: tl.constexpr,  # columns of N sharing a scale (at least N: one for the whole N)
    HAS_ZEROS: tl.constexpr,  # quantized with zero points
    ACT_FP8: tl.constexpr,  # w8a8: fp8 x fp8 dots, x quantized with per-row scales
    ACT_BLOCK: tl.constexpr,  # channels of x sharing a scale (at least H: per token)
):
    """Grouped gate and up projections with the gated activation in the epilogue.

    Grid: ``(MAX_BLOCKS * cdiv(F, BLOCK_N),)``. A program owns one row block (one expert) and one
    tile of ``BLOCK_N`` intermediate columns, in ``_row_block_tile``'s order. It gathers its token
    rows of ``x`` through ``sorted_pairs`` (no permuted copy of the activations), loads each
    ``[BLOCK_M, BLOCK_K]`` activation tile once for both projections, accumulates both in fp32,
    adds the expert's biases (``HAS_BIAS``), and writes the activation (``_swiglu``) for its rows
    (padding rows get that of zero inputs, which nothing reads), plus ``gate`` and ``up``
    themselves when the backward pass is to reuse them. Every program first zeroes its share of
    ``zeros`` (``_zero_fill``); then unused blocks exit. With
    ``HALF_BLOCKS`` a block whose second half is padding (often an expert's last block) computes
    its first half only: at ``BLOCK_M = 128`` that is still one whole 64-row warpgroup MMA, at half
    the cost; those padding rows stay unwritten.

    Quantized weights (``W_FORMAT``): their tiles are dequantized in registers, never in memory
    (``_gathered_dual_gemm``). Pointer layouts of the quantized weights: values as the float ones
    (4-bit formats two per byte along H: [E, H // 2, F] bytes), scales and zero points row-major.
    """
    _zero_fill(zeros_ptr, NUM_ZEROS, ZERO_BLOCK)
    num_col_tiles: tl.constexpr = (INTERMEDIATE + BLOCK_N - 1) // BLOCK_N
    block, col_tile, expert = _row_block_tile(
        tile=tl.program_id(0), block_expert_ptr=block_expert_ptr, expert_row_end_ptr=expert_row_end_ptr,
        MAX_BLOCKS=MAX_BLOCKS, NUM_COL_TILES=num_col_tiles, GROUP_M=GROUP_M, BLOCK_M=BLOCK_M,
    )
    if expert < 0:
        return
    if _second_half_is_padding(
        sorted_pairs_ptr=sorted_pairs_ptr, block=block, NUM_PAIRS=NUM_PAIRS, BLOCK_M=BLOCK_M,
        HALF_BLOCKS=HALF_BLOCKS,
    ):
        _gate_up_rows(
            x_ptr=x_ptr, w_gate_ptr=w_gate_ptr, w_up_ptr=w_up_ptr, shared_w_gate_ptr=shared_w_gate_ptr,
            shared_w_up_ptr=shared_w_up_ptr, gate_bias_ptr=gate_bias_ptr, up_bias_ptr=up_bias_ptr,
            sorted_pairs_ptr=sorted_pairs_ptr, act_ptr=act_ptr, gate_preact_ptr=gate_preact_ptr,
            up_preact_ptr=up_preact_ptr, block=block, col_tile=col_tile, expert=expert, NUM_PAIRS=NUM_PAIRS,
            x_scales_ptr=x_scales_ptr, w_gate_scales_ptr=w_gate_scales_ptr, w_gate_zeros_ptr=w_gate_zeros_ptr,
            w_up_scales_ptr=w_up_scales_ptr, w_up_zeros_ptr=w_up_zeros_ptr,
            shared_w_gate_scales_ptr=shared_w_gate_scales_ptr, shared_w_gate_zeros_ptr=shared_w_gate_zeros_ptr,
            shared_w_up_scales_ptr=shared_w_up_scales_ptr, shared_w_up_zeros_ptr=shared_w_up_zeros_ptr,
            TOP_K=TOP_K, NUM_ROUTED=NUM_ROUTED, HIDDEN=HIDDEN, INTERMEDIATE=INTERMEDIATE, BLOCK_M=BLOCK_M,
            ROWS=BLOCK_M // 2, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_PRECISION=DOT_PRECISION,
            HAS_BIAS=HAS_BIAS, ACTIVATION=ACTIVATION, ALPHA=ALPHA, LIMIT=LIMIT,
            SAVE_PREACTIVATIONS=SAVE_PREACTIVATIONS, USE_TMA=USE_TMA, W_FORMAT=W_FORMAT, SCALE_BLOCK_K=SCALE_BLOCK_K,
            SCALE_BLOCK_N=SCALE_BLOCK_N, HAS_ZEROS=HAS_ZEROS,
            ACT_FP8=ACT_FP8, ACT_BLOCK=ACT_BLOCK,
        )
    else:
        _gate_up_rows(
            x_ptr=x_ptr, w_gate_ptr=w_gate_ptr, w_up_ptr=w_up_ptr, shared_w_gate_ptr=shared_w_gate_ptr,
            shared_w_up_ptr=shared_w_up_ptr, gate_bias_ptr=gate_bias_ptr, up_bias_ptr=up_bias_ptr,
            sorted_pairs_ptr=sorted_pairs_ptr, act_ptr=act_ptr, gate_preact_ptr=gate_preact_ptr,
            up_preact_ptr=up_preact_ptr, block=block, col_tile=col_tile, expert=expert, NUM_PAIRS=NUM_PAIRS,
            x_scales_ptr=x_scales_ptr, w_gate_scales_ptr=w_gate_scales_ptr, w_gate_zeros_ptr=w_gate_zeros_ptr,
            w_up_scales_ptr=w_up_scales_ptr, w_up_zeros_ptr=w_up_zeros_ptr,
            shared_w_gate_scales_ptr=shared_w_gate_scales_ptr, shared_w_gate_zeros_ptr=shared_w_gate_zeros_ptr,
            shared_w_up_scales_ptr=shared_w_up_scales_ptr, shared_w_up_zeros_ptr=shared_w_up_zeros_ptr,
            TOP_K=TOP_K, NUM_ROUTED=NUM_ROUTED, HIDDEN=HIDDEN, INTERMEDIATE=INTERMEDIATE, BLOCK_M=BLOCK_M,
            ROWS=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_PRECISION=DOT_PRECISION, HAS_BIAS=HAS_BIAS,
            ACTIVATION=ACTIVATION, ALPHA=ALPHA, LIMIT=LIMIT, SAVE_PREACTIVATIONS=SAVE_PREACTIVATIONS,
            USE_TMA=USE_TMA, W_FORMAT=W_FORMAT, SCALE_BLOCK_K=SCALE_BLOCK_K, SCALE_BLOCK_N=SCALE_BLOCK_N,
            HAS_ZEROS=HAS_ZEROS,
            ACT_FP8=ACT_FP8, ACT_BLOCK=ACT_BLOCK,
        )


@triton.jit
def _gate_up_rows(
    x_ptr, w_gate_ptr, w_up_ptr, shared_w_gate_ptr, shared_w_up_ptr, gate_bias_ptr, up_bias_ptr,
    sorted_pairs_ptr, act_ptr, gate_preact_ptr, up_preact_ptr, block, col_tile, expert, x_scales_ptr,
    w_gate_scales_ptr, w_gate_zeros_ptr, w_up_scales_ptr, w_up_zeros_ptr, shared_w_gate_scales_ptr,
    shared_w_gate_zeros_ptr, shared_w_up_scales_ptr, shared_w_up_zeros_ptr,
    NUM_PAIRS: tl.constexpr, TOP_K: tl.constexpr, NUM_ROUTED: tl.constexpr, HIDDEN: tl.constexpr,
    INTERMEDIATE: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    ALPHA: tl.constexpr, LIMIT: tl.constexpr, SAVE_PREACTIVATIONS: tl.constexpr, USE_TMA: tl.constexpr,
    W_FORMAT: tl.constexpr, SCALE_BLOCK_K: tl.constexpr, SCALE_BLOCK_N: tl.constexpr, HAS_ZEROS: tl.constexpr,
    ACT_FP8: tl.constexpr, ACT_BLOCK: tl.constexpr,
):
    """``gate_up_kernel``'s work on the first ``ROWS`` rows of a row block."""
    rows, pairs, is_real, tokens = _block_pairs(
        sorted_pairs_ptr=sorted_pairs_ptr, block=block, NUM_PAIRS=NUM_PAIRS, TOP_K=TOP_K, BLOCK_M=BLOCK_M,
        ROWS=ROWS,
    )
    col_start = col_tile * BLOCK_N
    cols = col_start + tl.arange(0, BLOCK_N)
    col_ok = cols < INTERMEDIATE
    gate, up = _gate_up_preactivations(
        x_ptr=x_ptr, tokens=tokens, is_real=is_real, w_gate_ptr=w_gate_ptr, w_up_ptr=w_up_ptr,
        shared_w_gate_ptr=shared_w_gate_ptr, shared_w_up_ptr=shared_w_up_ptr, gate_bias_ptr=gate_bias_ptr,
        up_bias_ptr=up_bias_ptr, expert=expert, col_start=col_start, cols=cols, col_ok=col_ok,
        x_scales_ptr=x_scales_ptr, w_gate_scales_ptr=w_gate_scales_ptr, w_gate_zeros_ptr=w_gate_zeros_ptr,
        w_up_scales_ptr=w_up_scales_ptr, w_up_zeros_ptr=w_up_zeros_ptr,
        shared_w_gate_scales_ptr=shared_w_gate_scales_ptr, shared_w_gate_zeros_ptr=shared_w_gate_zeros_ptr,
        shared_w_up_scales_ptr=shared_w_up_scales_ptr, shared_w_up_zeros_ptr=shared_w_up_zeros_ptr,
        NUM_ROUTED=NUM_ROUTED, HIDDEN=HIDDEN, INTERMEDIATE=INTERMEDIATE, BLOCK_M=ROWS, BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K, DOT_PRECISION=DOT_PRECISION, HAS_BIAS=HAS_BIAS, USE_TMA=USE_TMA,
        W_FORMAT=W_FORMAT, SCALE_BLOCK_K=SCALE_BLOCK_K, SCALE_BLOCK_N=SCALE_BLOCK_N, HAS_ZEROS=HAS_ZEROS,
        ACT_FP8=ACT_FP8, ACT_BLOCK=ACT_BLOCK,
    )
    offsets = rows[:, None] * INTERMEDIATE + cols[None, :]
    act, _, _ = _swiglu(gate=gate, up=up, ACTIVATION=ACTIVATION, ALPHA=ALPHA, LIMIT=LIMIT)
    tl.store(act_ptr + offsets, act.to(act_ptr.dtype.element_ty), mask=col_ok[None, :])
    if SAVE_PREACTIVATIONS:
        tl.store(gate_preact_ptr + offsets, gate.to(gate_preact_ptr.dtype.element_ty), mask=col_ok[None, :])
        tl.store(up_preact_ptr + offsets, up.to(up_preact_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit
def expert_gemm_combine_kernel(
    a_ptr,  # [MAX_BLOCKS * BLOCK_M, K] per-row left operand (sorted-row order)
    b_ptr,  # [E, K, N] right operand, row-major, or with B_TRANSPOSED the transposes of row-major [E, N, K]
    shared_b_ptr,  # [S, ...] the same for the shared experts E .. E + S - 1
    a2_ptr,  # like a_ptr, second term (read only if SECOND_TERM)
    b2_ptr,  # like b_ptr, second term (read only if SECOND_TERM)
    shared_b2_ptr,  # like shared_b_ptr, second term (read only if SECOND_TERM)
    bias_ptr,  # [E, N] routed experts' output bias, added before the routing weight (read only if HAS_BIAS)
    routing_weights_ptr,  # [NUM_PAIRS] float32 (read only if SCALE_BY_ROUTING_WEIGHT)
    sorted_pairs_ptr,  # [MAX_BLOCKS * BLOCK_M] int32
    block_expert_ptr,  # [MAX_BLOCKS] int32
    expert_row_end_ptr,  # [EXPERTS_PAD] int32 (read only if GROUP_M == 0)
    a_scales_ptr,  # [MAX_BLOCKS * BLOCK_M, cdiv(K, ACT_BLOCK)] float32 scales of fp8 a (read only if ACT_FP8)
    b_scales_ptr,  # [E, ...] b's scales, row-major over b's stored matrix (read only if quantized)
    b_zeros_ptr,  # like b_scales_ptr, zero points (read only if HAS_ZEROS)
    shared_b_scales_ptr,  # [S, ...] the same for the shared experts
    shared_b_zeros_ptr,
    b2_scales_ptr,  # like b_scales_ptr, second term
    b2_zeros_ptr,
    shared_b2_scales_ptr,
    shared_b2_zeros_ptr,
    zeroed_arrivals_ptr,  # [T, cdiv(N, BLOCK_N)] int32 zeros: arrivals_ptr's buffer on its way in (never read)
    out_ptr,  # out [T, N]
    partial_ptr,  # out (scratch) [NUM_PAIRS, N] float32 or bfloat16, one row per pair (TOP_K > 1)
    arrivals_ptr,  # out (scratch) [T, cdiv(N, BLOCK_N)] int32, zero at launch: updated in place (TOP_K > 1)
    NUM_PAIRS: tl.constexpr,
    TOP_K: tl.constexpr,
    NUM_ROUTED: tl.constexpr,
    K: tl.constexpr,
    N: tl.constexpr,
    B_TRANSPOSED: tl.constexpr,
    SECOND_TERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SCALE_BY_ROUTING_WEIGHT: tl.constexpr,
    MAX_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HALF_BLOCKS: tl.constexpr,  # compute only the first half of blocks whose second half is padding
    USE_TMA: tl.constexpr,  # read the weight tiles through TMA descriptors (row-major b only)
    W_FORMAT: tl.constexpr,  # as gate_up_kernel's, for b and b2
    SCALE_BLOCK_K: tl.constexpr,  # of b's stored matrix
    SCALE_BLOCK_N: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    ACT_FP8: tl.constexpr,  # a holds fp8 bytes with per-row scales (row-major b only)
    ACT_BLOCK: tl.constexpr,
):
    """Grouped GEMM over the sorted rows with a deterministic per-token top-k combine.

    Forward down projection: ``out[t] = sum_k weight_k * (act_k @ w_down[e_k] + bias[e_k])`` (one
    term, scaled; the bias only with ``HAS_BIAS`` and only for routed experts).
    Backward input gradient: ``dx[t] = sum_k d_gate_k @ w_gate[e_k]^T + d_up_k @ w_up[e_k]^T``
    (two terms, transposed weights through the strides, unscaled).

    Grid: ``(MAX_BLOCKS * cdiv(N, BLOCK_N),)``. A program owns one row block (one expert) and one
    tile of ``BLOCK_N`` output columns, in ``_row_block_tile``'s order, and computes its rows'
    products in fp32 (only the first half of the rows with ``HALF_BLOCKS``, as in
    ``gate_up_kernel``, when the rest is padding).

    With ``TOP_K == 1`` a row is its token's result. Otherwise each pair's row goes to ``partial``
    (rounded to its dtype) and the program counts one arrival per (token, column tile); the program
    that brings a token's count to ``TOP_K`` sums the token's ``TOP_K`` partial rows in fp32, in
    slot order, and writes the result.
    The sum's order never depends on scheduling, so every run gives the same bits, with no extra
    launch. The rows of one block hold distinct pairs, so their counters are updated once each.

    Quantized weights are dequantized tile by tile in registers (``_gathered_gemm``).
    """
    num_col_tiles: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    block, col_tile, expert = _row_block_tile(
        tile=tl.program_id(0), block_expert_ptr=block_expert_ptr, expert_row_end_ptr=expert_row_end_ptr,
        MAX_BLOCKS=MAX_BLOCKS, NUM_COL_TILES=num_col_tiles, GROUP_M=GROUP_M, BLOCK_M=BLOCK_M,
    )
    if expert < 0:
        return
    if _second_half_is_padding(
        sorted_pairs_ptr=sorted_pairs_ptr, block=block, NUM_PAIRS=NUM_PAIRS, BLOCK_M=BLOCK_M,
        HALF_BLOCKS=HALF_BLOCKS,
    ):
        _gemm_combine_rows(
            a_ptr=a_ptr, b_ptr=b_ptr, shared_b_ptr=shared_b_ptr, a2_ptr=a2_ptr, b2_ptr=b2_ptr,
            shared_b2_ptr=shared_b2_ptr, bias_ptr=bias_ptr, routing_weights_ptr=routing_weights_ptr,
            sorted_pairs_ptr=sorted_pairs_ptr, out_ptr=out_ptr, partial_ptr=partial_ptr,
            arrivals_ptr=arrivals_ptr, block=block, col_tile=col_tile, expert=expert, a_scales_ptr=a_scales_ptr,
            b_scales_ptr=b_scales_ptr, b_zeros_ptr=b_zeros_ptr, shared_b_scales_ptr=shared_b_scales_ptr,
            shared_b_zeros_ptr=shared_b_zeros_ptr, b2_scales_ptr=b2_scales_ptr, b2_zeros_ptr=b2_zeros_ptr,
            shared_b2_scales_ptr=shared_b2_scales_ptr, shared_b2_zeros_ptr=shared_b2_zeros_ptr, NUM_PAIRS=NUM_PAIRS,
            TOP_K=TOP_K, NUM_ROUTED=NUM_ROUTED, K=K, N=N, B_TRANSPOSED=B_TRANSPOSED,
            SECOND_TERM=SECOND_TERM, HAS_BIAS=HAS_BIAS, SCALE_BY_ROUTING_WEIGHT=SCALE_BY_ROUTING_WEIGHT,
            BLOCK_M=BLOCK_M, ROWS=BLOCK_M // 2, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_PRECISION=DOT_PRECISION,
            USE_TMA=USE_TMA, W_FORMAT=W_FORMAT, SCALE_BLOCK_K=SCALE_BLOCK_K, SCALE_BLOCK_N=SCALE_BLOCK_N,
            HAS_ZEROS=HAS_ZEROS, ACT_FP8=ACT_FP8, ACT_BLOCK=ACT_BLOCK,
        )
    else:
        _gemm_combine_rows(
            a_ptr=a_ptr, b_ptr=b_ptr, shared_b_ptr=shared_b_ptr, a2_ptr=a2_ptr, b2_ptr=b2_ptr,
            shared_b2_ptr=shared_b2_ptr, bias_ptr=bias_ptr, routing_weights_ptr=routing_weights_ptr,
            sorted_pairs_ptr=sorted_pairs_ptr, out_ptr=out_ptr, partial_ptr=partial_ptr,
            arrivals_ptr=arrivals_ptr, block=block, col_tile=col_tile, expert=expert, a_scales_ptr=a_scales_ptr,
            b_scales_ptr=b_scales_ptr, b_zeros_ptr=b_zeros_ptr, shared_b_scales_ptr=shared_b_scales_ptr,
            shared_b_zeros_ptr=shared_b_zeros_ptr, b2_scales_ptr=b2_scales_ptr, b2_zeros_ptr=b2_zeros_ptr,
            shared_b2_scales_ptr=shared_b2_scales_ptr, shared_b2_zeros_ptr=shared_b2_zeros_ptr, NUM_PAIRS=NUM_PAIRS,
            TOP_K=TOP_K, NUM_ROUTED=NUM_ROUTED, K=K, N=N, B_TRANSPOSED=B_TRANSPOSED,
            SECOND_TERM=SECOND_TERM, HAS_BIAS=HAS_BIAS, SCALE_BY_ROUTING_WEIGHT=SCALE_BY_ROUTING_WEIGHT,
            BLOCK_M=BLOCK_M, ROWS=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_PRECISION=DOT_PRECISION,
            USE_TMA=USE_TMA, W_FORMAT=W_FORMAT, SCALE_BLOCK_K=SCALE_BLOCK_K, SCALE_BLOCK_N=SCALE_BLOCK_N,
            HAS_ZEROS=HAS_ZEROS, ACT_FP8=ACT_FP8, ACT_BLOCK=ACT_BLOCK,
        )


@triton.jit
def _gemm_combine_rows(
    a_ptr, b_ptr, shared_b_ptr, a2_ptr, b2_ptr, shared_b2_ptr, bias_ptr, routing_weights_ptr, sorted_pairs_ptr,
    out_ptr, partial_ptr, arrivals_ptr, block, col_tile, expert, a_scales_ptr, b_scales_ptr, b_zeros_ptr,
    shared_b_scales_ptr, shared_b_zeros_ptr, b2_scales_ptr, b2_zeros_ptr, shared_b2_scales_ptr, shared_b2_zeros_ptr,
    NUM_PAIRS: tl.constexpr, TOP_K: tl.constexpr,
    NUM_ROUTED: tl.constexpr, K: tl.constexpr, N: tl.constexpr, B_TRANSPOSED: tl.constexpr,
    SECOND_TERM: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_BY_ROUTING_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, W_FORMAT: tl.constexpr, SCALE_BLOCK_K: tl.constexpr,
    SCALE_BLOCK_N: tl.constexpr, HAS_ZEROS: tl.constexpr,
    ACT_FP8: tl.constexpr, ACT_BLOCK: tl.constexpr,
):
    """``expert_gemm_combine_kernel``'s work on the first ``ROWS`` rows of a row block."""
    num_col_tiles: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    rows, pairs, is_real, tokens = _block_pairs(
        sorted_pairs_ptr=sorted_pairs_ptr, block=block, NUM_PAIRS=NUM_PAIRS, TOP_K=TOP_K, BLOCK_M=BLOCK_M,
        ROWS=ROWS,
    )
    col_start = col_tile * BLOCK_N
    cols = col_start + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    # The stored matrix of b: [K, N], or [N, K] transposed.
    stored_rows: tl.constexpr = N if B_TRANSPOSED else K
    stored_cols: tl.constexpr = K if B_TRANSPOSED else N

    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    b, b_scales, b_zeros = _expert_weight(
        routed_ptr=b_ptr, routed_scales_ptr=b_scales_ptr, routed_zeros_ptr=b_zeros_ptr, shared_ptr=shared_b_ptr,
        shared_scales_ptr=shared_b_scales_ptr, shared_zeros_ptr=shared_b_zeros_ptr, expert=expert,
        NUM_ROUTED=NUM_ROUTED, K=stored_rows, N=stored_cols, W_FORMAT=W_FORMAT, SCALE_BLOCK_K=SCALE_BLOCK_K,
        SCALE_BLOCK_N=SCALE_BLOCK_N,
    )
    acc = _gathered_gemm(
        acc=acc, a_ptr=a_ptr, a_scales_ptr=a_scales_ptr, a_rows=rows, a_row_ok=is_real, b_ptr=b,
        b_scales_ptr=b_scales, b_zeros_ptr=b_zeros, col_start=col_start, cols=cols, col_ok=col_ok, K=K, N=N,
        B_TRANSPOSED=B_TRANSPOSED, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_PRECISION=DOT_PRECISION, USE_TMA=USE_TMA,
        W_FORMAT=W_FORMAT, SCALE_BLOCK_K=SCALE_BLOCK_K, SCALE_BLOCK_N=SCALE_BLOCK_N, HAS_ZEROS=HAS_ZEROS,
        ACT_FP8=ACT_FP8, ACT_BLOCK=ACT_BLOCK,
    )
    if SECOND_TERM:
        b2, b2_scales, b2_zeros = _expert_weight(
            routed_ptr=b2_ptr, routed_scales_ptr=b2_scales_ptr, routed_zeros_ptr=b2_zeros_ptr,
            shared_ptr=shared_b2_ptr, shared_scales_ptr=shared_b2_scales_ptr, shared_zeros_ptr=shared_b2_zeros_ptr,
            expert=expert, NUM_ROUTED=NUM_ROUTED, K=stored_rows, N=stored_cols, W_FORMAT=W_FORMAT,
            SCALE_BLOCK_K=SCALE_BLOCK_K, SCALE_BLOCK_N=SCALE_BLOCK_N,
        )
        acc = _gathered_gemm(
            acc=acc, a_ptr=a2_ptr, a_scales_ptr=a_scales_ptr, a_rows=rows, a_row_ok=is_real, b_ptr=b2,
            b_scales_ptr=b2_scales, b_zeros_ptr=b2_zeros, col_start=col_start, cols=cols, col_ok=col_ok, K=K, N=N,
            B_TRANSPOSED=B_TRANSPOSED, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_PRECISION=DOT_PRECISION,
            USE_TMA=USE_TMA, W_FORMAT=W_FORMAT, SCALE_BLOCK_K=SCALE_BLOCK_K, SCALE_BLOCK_N=SCALE_BLOCK_N,
            HAS_ZEROS=HAS_ZEROS, ACT_FP8=ACT_FP8, ACT_BLOCK=ACT_BLOCK,
        )
    if HAS_BIAS:
        acc += _expert_bias(
            bias_ptr=bias_ptr, expert=expert, cols=cols, col_ok=col_ok, NUM_ROUTED=NUM_ROUTED, N=N,
        )
    if SCALE_BY_ROUTING_WEIGHT:
        acc = acc * tl.load(routing_weights_ptr + pairs, mask=is_real, other=0.0)[:, None]
    out_dtype = out_ptr.dtype.element_ty

    if TOP_K == 1:
        out_ptrs = out_ptr + tokens[:, None] * N + cols[None, :]
        tl.store(out_ptrs, acc.to(out_dtype), mask=is_real[:, None] & col_ok[None, :])
    else:
        partial_rows = partial_ptr + pairs.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(partial_rows, acc.to(partial_ptr.dtype.element_ty), mask=is_real[:, None] & col_ok[None, :])
        # Every thread's partial stores must be done before any thread announces the arrival;
        # the acq_rel atomic then publishes them to the program that finishes the token.
        tl.debug_barrier()
        arrived_before = tl.atomic_add(
            arrivals_ptr + tokens * num_col_tiles + col_tile, 1, mask=is_real, sem="acq_rel", scope="gpu"
        )
        finishes = is_real & (arrived_before == TOP_K - 1)
        tl.debug_barrier()
        # The reload is latency-bound: a whole-tile fp32 sum leaves registers for one slot's rows
        # in flight at a time, TOP_K round trips to L2 per tile. Column chunks of 64 fit all TOP_K
        # loads at once; the sum per element is the same, in the same order.
        chunk_cols: tl.constexpr = 64 if BLOCK_N > 64 else BLOCK_N
        first_pair = tokens * TOP_K
        for chunk_start in tl.static_range(0, BLOCK_N, chunk_cols):
            chunk = col_tile * BLOCK_N + chunk_start + tl.arange(0, chunk_cols)
            chunk_mask = finishes[:, None] & (chunk < N)[None, :]
            total = tl.zeros([ROWS, chunk_cols], dtype=tl.float32)
            for slot in tl.static_range(TOP_K):
                # .cg: read from L2, where other programs' partial rows landed, not from a stale L1.
                total += tl.load(
                    partial_ptr + (first_pair + slot)[:, None] * N + chunk[None, :],
                    mask=chunk_mask,
                    other=0.0,
                    cache_modifier=".cg",
                ).to(tl.float32)
            tl.store(out_ptr + tokens[:, None] * N + chunk[None, :], total.to(out_dtype), mask=chunk_mask)


@triton.jit
def gate_up_backward_kernel(
    x_ptr,  # [T, H] activations
    w_gate_ptr,  # [E, H, F]
    w_up_ptr,  # [E, H, F]
    w_down_ptr,  # [E, F, H]
    shared_w_gate_ptr,  # [S, H, F]
    shared_w_up_ptr,  # [S, H, F]
    shared_w_down_ptr,  # [S, F, H]
    gate_bias_ptr,  # [E, F] (read only if HAS_BIAS and RECOMPUTE)
    up_bias_ptr,  # [E, F] (read only if HAS_BIAS and RECOMPUTE)
    grad_out_ptr,  # [T, H] gradient of the layer output
    routing_weights_ptr,  # [NUM_PAIRS] float32
    gate_preact_ptr,  # [MAX_BLOCKS * BLOCK_M, F] saved gate pre-activations (read only if not RECOMPUTE)
    up_preact_ptr,  # [MAX_BLOCKS * BLOCK_M, F] saved up pre-activations (read only if not RECOMPUTE)
    sorted_pairs_ptr,  # [MAX_BLOCKS * BLOCK_M] int32
    block_expert_ptr,  # [MAX_BLOCKS] int32
    expert_row_end_ptr,  # [EXPERTS_PAD] int32 (read only if GROUP_M == 0)
    x_scales_ptr,  # as gate_up_kernel's (read only if ACT_FP8 and RECOMPUTE)
    w_gate_scales_ptr,  # as gate_up_kernel's: scales and zero points of the quantized weights
    w_gate_zeros_ptr,
    w_up_scales_ptr,
    w_up_zeros_ptr,
    shared_w_gate_scales_ptr,
    shared_w_gate_zeros_ptr,
    shared_w_up_scales_ptr,
    shared_w_up_zeros_ptr,
    w_down_scales_ptr,  # [E, cdiv(F, SCALE_BLOCK_K), cdiv(H, SCALE_BLOCK_N)] (read only if quantized)
    w_down_zeros_ptr,  # (read only if HAS_ZEROS)
    shared_w_down_scales_ptr,
    shared_w_down_zeros_ptr,
    weighted_act_ptr,  # out [MAX_BLOCKS * BLOCK_M, F] routing weight * activation, for the down weight gradient
    grad_gate_ptr,  # out [MAX_BLOCKS * BLOCK_M, F] gradient of the gate pre-activation
    grad_up_ptr,  # out [MAX_BLOCKS * BLOCK_M, F] gradient of the up pre-activation
    grad_weight_part_ptr,  # out [NUM_PAIRS, cdiv(F, BLOCK_N)] float32, see below
    zeros_ptr,  # out [NUM_ZEROS] int32: zeros, the input gradient's arrival counters (_zero_fill)
    NUM_PAIRS: tl.constexpr,
    TOP_K: tl.constexpr,
    NUM_ROUTED: tl.constexpr,
    HIDDEN: tl.constexpr,
    INTERMEDIATE: tl.constexpr,
    MAX_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ALPHA: tl.constexpr,
    LIMIT: tl.constexpr,
    RECOMPUTE: tl.constexpr,
    NUM_ZEROS: tl.constexpr,
    ZERO_BLOCK: tl.constexpr,
    USE_TMA: tl.constexpr,  # recompute with the weight tiles read through TMA descriptors
    W_FORMAT: tl.constexpr,  # as gate_up_kernel's, for all three weights
    SCALE_BLOCK_K: tl.constexpr,
    SCALE_BLOCK_N: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    ACT_FP8: tl.constexpr,  # the recomputation reads fp8 x, as the forward
    ACT_BLOCK: tl.constexpr,
):
    """Backward through the down projection and the gated activation, per row block and tile.

    Grid: ``(MAX_BLOCKS * cdiv(F, BLOCK_N),)``, the forward gate/up grid and order. For its rows
    and columns a program gets the pre-activations ``gate`` and ``up`` (recomputed as in the
    forward, biases included, or loaded), and ``g = grad_out[token] @ w_down[e]^T``. Then, with
    ``w`` the row's routing weight and ``act, d/dgate, d/dup = _swiglu(gate, up)``:

    * ``w * act`` is stored: the down-projection weight gradient is ``(w * act)^T @ grad_out``
      (scaling here, in the epilogue, keeps that kernel's operands straight from memory);
    * ``d_gate = w * g * d/dgate`` and ``d_up = w * g * d/dup``;
    * ``sum(act * g)`` over its columns: the tile's share of the routing weight's gradient
      ``<act @ w_down[e], grad_out[token]>``; the caller adds the shares of all tiles (and the
      down bias's share).

    Every program first zeroes its share of ``zeros`` (``_zero_fill``); then unused blocks exit.
    Quantized weights are dequantized tile by tile in registers, as in the forward.
    """
    _zero_fill(zeros_ptr, NUM_ZEROS, ZERO_BLOCK)
    num_col_tiles: tl.constexpr = (INTERMEDIATE + BLOCK_N - 1) // BLOCK_N
    block, col_tile, expert = _row_block_tile(
        tile=tl.program_id(0), block_expert_ptr=block_expert_ptr, expert_row_end_ptr=expert_row_end_ptr,
        MAX_BLOCKS=MAX_BLOCKS, NUM_COL_TILES=num_col_tiles, GROUP_M=GROUP_M, BLOCK_M=BLOCK_M,
    )
    if expert < 0:
        return
    rows, pairs, is_real, tokens = _block_pairs(
        sorted_pairs_ptr=sorted_pairs_ptr, block=block, NUM_PAIRS=NUM_PAIRS, TOP_K=TOP_K, BLOCK_M=BLOCK_M,
        ROWS=BLOCK_M,
    )
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < INTERMEDIATE
    offsets = rows[:, None] * INTERMEDIATE + cols[None, :]

    if RECOMPUTE:
        gate, up = _gate_up_preactivations(
            x_ptr=x_ptr, tokens=tokens, is_real=is_real, w_gate_ptr=w_gate_ptr, w_up_ptr=w_up_ptr,
            shared_w_gate_ptr=shared_w_gate_ptr, shared_w_up_ptr=shared_w_up_ptr, gate_bias_ptr=gate_bias_ptr,
            up_bias_ptr=up_bias_ptr, expert=expert, col_start=col_tile * BLOCK_N, cols=cols, col_ok=col_ok,
            NUM_ROUTED=NUM_ROUTED, HIDDEN=HIDDEN, INTERMEDIATE=INTERMEDIATE, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K, DOT_PRECISION=DOT_PRECISION, HAS_BIAS=HAS_BIAS, USE_TMA=USE_TMA,
            x_scales_ptr=x_scales_ptr, w_gate_scales_ptr=w_gate_scales_ptr, w_gate_zeros_ptr=w_gate_zeros_ptr,
            w_up_scales_ptr=w_up_scales_ptr, w_up_zeros_ptr=w_up_zeros_ptr,
            shared_w_gate_scales_ptr=shared_w_gate_scales_ptr, shared_w_gate_zeros_ptr=shared_w_gate_zeros_ptr,
            shared_w_up_scales_ptr=shared_w_up_scales_ptr, shared_w_up_zeros_ptr=shared_w_up_zeros_ptr,
            W_FORMAT=W_FORMAT, SCALE_BLOCK_K=SCALE_BLOCK_K, SCALE_BLOCK_N=SCALE_BLOCK_N, HAS_ZEROS=HAS_ZEROS,
            ACT_FP8=ACT_FP8, ACT_BLOCK=ACT_BLOCK,
        )
    else:
        gate = tl.load(gate_preact_ptr + offsets, mask=col_ok[None, :], other=0.0).to(tl.float32)
        up = tl.load(up_preact_ptr + offsets, mask=col_ok[None, :], other=0.0).to(tl.float32)
    # w_down[e] is [F, H]: the GEMM reads its transpose, [H, F].
    g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_down, w_down_scales, w_down_zeros = _expert_weight(
        routed_ptr=w_down_ptr, routed_scales_ptr=w_down_scales_ptr, routed_zeros_ptr=w_down_zeros_ptr,
        shared_ptr=shared_w_down_ptr, shared_scales_ptr=shared_w_down_scales_ptr,
        shared_zeros_ptr=shared_w_down_zeros_ptr, expert=expert, NUM_ROUTED=NUM_ROUTED, K=INTERMEDIATE, N=HIDDEN,
        W_FORMAT=W_FORMAT, SCALE_BLOCK_K=SCALE_BLOCK_K, SCALE_BLOCK_N=SCALE_BLOCK_N,
    )
    g = _gathered_gemm(
        acc=g, a_ptr=grad_out_ptr, a_scales_ptr=x_scales_ptr, a_rows=tokens, a_row_ok=is_real, b_ptr=w_down,
        b_scales_ptr=w_down_scales, b_zeros_ptr=w_down_zeros, col_start=col_tile * BLOCK_N, cols=cols,
        col_ok=col_ok, K=HIDDEN, N=INTERMEDIATE, B_TRANSPOSED=True, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        DOT_PRECISION=DOT_PRECISION, USE_TMA=False, W_FORMAT=W_FORMAT, SCALE_BLOCK_K=SCALE_BLOCK_K,
        SCALE_BLOCK_N=SCALE_BLOCK_N, HAS_ZEROS=HAS_ZEROS, ACT_FP8=False, ACT_BLOCK=ACT_BLOCK,
    )

    act, act_by_gate, act_by_up = _swiglu(gate=gate, up=up, ACTIVATION=ACTIVATION, ALPHA=ALPHA, LIMIT=LIMIT)
    tl.store(
        grad_weight_part_ptr + pairs.to(tl.int64) * num_col_tiles + col_tile,
        tl.sum(act * g, axis=1),
        mask=is_real,
    )
    routing_weight = tl.load(routing_weights_ptr + pairs, mask=is_real, other=0.0)[:, None]
    d_act = g * routing_weight
    tl.store(
        weighted_act_ptr + offsets, (act * routing_weight).to(weighted_act_ptr.dtype.element_ty), mask=col_ok[None, :]
    )
    tl.store(grad_gate_ptr + offsets, (d_act * act_by_gate).to(grad_gate_ptr.dtype.element_ty), mask=col_ok[None, :])
    tl.store(grad_up_ptr + offsets, (d_act * act_by_up).to(grad_up_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit
def expert_weight_grad_kernel(
    a_ptr,  # [T, M] if A_BY_TOKEN else [MAX_BLOCKS * BLOCK_M_ROWS, M]: rows of the left operand
    b_ptr,  # [T, N] if B_BY_TOKEN else [MAX_BLOCKS * BLOCK_M_ROWS, N]: rows of the right operand
    b2_ptr,  # like b_ptr, second right operand (read only if DUAL)
    routing_weights_ptr,  # [NUM_PAIRS] float32 (read only if BIAS_GRAD and WEIGHTED_BIAS_GRAD)
    sorted_pairs_ptr,  # [rows] int32, from dispatch_kernel
    expert_row_end_ptr,  # [>= E + S] int32, from dispatch_kernel
    out_ptr,  # out [E, M, N]: sum over the expert's rows of a_row^T b_row
    shared_out_ptr,  # out [S, M, N]: the same for the shared experts E .. E + S - 1
    out2_ptr,  # out [E, M, N]: the same with b2 (written only if DUAL)
    shared_out2_ptr,  # out [S, M, N] (written only if DUAL)
    bias_out_ptr,  # out [E, N]: sum over the expert's rows of b_row (written only if BIAS_GRAD)
    bias_out2_ptr,  # out [E, N]: the same for b2 (written only if BIAS_GRAD and DUAL)
    NUM_PAIRS: tl.constexpr,
    TOP_K: tl.constexpr,
    NUM_ROUTED: tl.constexpr,
    M: tl.constexpr,
    N: tl.constexpr,
    A_BY_TOKEN: tl.constexpr,
    B_BY_TOKEN: tl.constexpr,
    DUAL: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    WEIGHTED_BIAS_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Per-expert weight gradients: ``out[e] = A_e^T @ B_e`` over expert e's rows only.

    ``dw_down[e] = (w * act)_e^T @ grad_out[tokens]_e`` (A by row, B by token) and
    ``dw_gate[e], dw_up[e] = x[tokens]_e^T @ (d_gate_e, d_up_e)`` (A by token, dual B by row).
    With ``BIAS_GRAD`` the column sums of ``B_e`` (the routed experts' bias gradients), each row
    weighted by its routing weight if ``WEIGHTED_BIAS_GRAD`` (the down bias), come along: the
    programs of the first ``M`` tile write them. Both operands go from memory to the dot untouched.

    Grid: ``((E + S) * cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),)``, expert-major, each expert's tiles in
    ``GROUP_M``-row groups (``_grouped_tile``). A program owns one expert and one
    ``[BLOCK_M, BLOCK_N]`` tile of its gradient, and walks that expert's rows ``BLOCK_K`` at a time
    (the reduction dimension), fp32 accumulation; padding rows contribute zero and an expert
    without rows gets zeros. No dense [E, T, ...] temporary and no atomics: each element is one
    program's fixed-order sum.
    """
    m_tiles: tl.constexpr = (M + BLOCK_M - 1) // BLOCK_M
    n_tiles: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)
    expert = pid // (m_tiles * n_tiles)
    m_tile, n_tile = _grouped_tile(pid % (m_tiles * n_tiles), m_tiles, n_tiles, GROUP_M)
    row_start = tl.load(expert_row_end_ptr + expert - 1, mask=expert > 0, other=0)
    row_end = tl.load(expert_row_end_ptr + expert)

    ms = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = ms < M
    n_ok = ns < N
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    bias_acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k_start in range(row_start, row_end, BLOCK_K):
        rows = k_start + ks
        pairs = tl.load(sorted_pairs_ptr + rows, mask=rows < row_end, other=NUM_PAIRS)
        is_real = pairs < NUM_PAIRS
        tokens = (pairs // TOP_K).to(tl.int64)
        a_rows = tokens if A_BY_TOKEN else rows.to(tl.int64)
        b_rows = tokens if B_BY_TOKEN else rows.to(tl.int64)
        a_t = tl.load(a_ptr + a_rows[None, :] * M + ms[:, None], mask=is_real[None, :] & m_ok[:, None], other=0.0)
        b_mask = is_real[:, None] & n_ok[None, :]
        b = tl.load(b_ptr + b_rows[:, None] * N + ns[None, :], mask=b_mask, other=0.0)
        acc = tl.dot(a_t, b, acc, input_precision=DOT_PRECISION)
        if BIAS_GRAD:
            if WEIGHTED_BIAS_GRAD:
                row_weight = tl.load(routing_weights_ptr + pairs, mask=is_real, other=0.0)
                bias_acc += tl.sum(b.to(tl.float32) * row_weight[:, None], axis=0)
            else:
                bias_acc += tl.sum(b.to(tl.float32), axis=0)
        if DUAL:
            b2 = tl.load(b2_ptr + b_rows[:, None] * N + ns[None, :], mask=b_mask, other=0.0)
            acc2 = tl.dot(a_t, b2, acc2, input_precision=DOT_PRECISION)
            if BIAS_GRAD:
                bias_acc2 += tl.sum(b2.to(tl.float32), axis=0)

    matrix_size: tl.constexpr = M * N
    tile_offsets = ms[:, None] * N + ns[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    out_tile = _expert_matrix(
        routed_ptr=out_ptr, shared_ptr=shared_out_ptr, expert=expert, NUM_ROUTED=NUM_ROUTED,
        MATRIX_SIZE=matrix_size,
    ) + tile_offsets
    tl.store(out_tile, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    if DUAL:
        out2_tile = _expert_matrix(
            routed_ptr=out2_ptr, shared_ptr=shared_out2_ptr, expert=expert, NUM_ROUTED=NUM_ROUTED,
            MATRIX_SIZE=matrix_size,
        ) + tile_offsets
        tl.store(out2_tile, acc2.to(out2_ptr.dtype.element_ty), mask=out_mask)
    if BIAS_GRAD:
        if (m_tile == 0) & (expert < NUM_ROUTED):
            bias_offsets = expert.to(tl.int64) * N + ns
            tl.store(bias_out_ptr + bias_offsets, bias_acc.to(bias_out_ptr.dtype.element_ty), mask=n_ok)
            if DUAL:
                tl.store(bias_out2_ptr + bias_offsets, bias_acc2.to(bias_out2_ptr.dtype.element_ty), mask=n_ok)
