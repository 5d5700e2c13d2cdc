"""Replicas and their devices, jointly, for every layer at once (vectorised over layers).

Legend: L MoE layers, E logical experts, P physical slots per layer (-1 padded where layers
differ), G devices.

``replicate``: each extra slot goes to the expert with the largest ``weight / logcnt`` (no cap on
copies): the counts that minimise the heaviest per-copy load, the quantity the lower bound of a
layer's device max/mean is made of. ``place``: slots heaviest copy first onto the least-loaded
device that has room (``capacity`` in slot sizes: 1 per slot and P/G per device for engines,
bytes for a rewrite) and does not hold that expert yet (copies of one expert on one device do
not spread anything), then a local search of moves and swaps off each layer's busiest device.
``build_layout`` chains both and returns slots in the planner's convention (slots 0..E-1 the
originals, replicas appended by expert id).
"""

from __future__ import annotations

import math

import torch

_EPS = 1e-12


def replicate(weight: torch.Tensor, num_slots: torch.Tensor) -> torch.Tensor:
    """``weight [L, E]`` >= 0, ``num_slots [L]`` (>= E) -> ``logcnt [L, E]`` int64 (rows sum to num_slots).

    Greedy: each of the ``num_slots - E`` extra slots to ``argmax weight / logcnt`` (ties: lower
    id). A layer without weight is treated as uniform.
    """
    w = weight.double()
    L, E = w.shape
    w = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))
    num_slots = torch.as_tensor(num_slots, dtype=torch.int64).expand(L)
    logcnt = torch.ones(L, E, dtype=torch.int64)
    extra = num_slots - E
    assert int(extra.min()) >= 0, "fewer slots than experts"
    rows = torch.arange(L)
    for i in range(int(extra.max()) if L else 0):
        e = torch.argmax(w / logcnt, dim=-1)
        logcnt[rows, e] += (i < extra).long()
    return logcnt


def slots_of(logcnt: torch.Tensor) -> torch.Tensor:
    """``logcnt [L, E]`` -> ``phy2log [L, P]`` (-1 pad): originals 0..E-1, then replicas by expert id."""
    L, E = logcnt.shape
    P = int(logcnt.sum(-1).max())
    out = torch.full((L, P), -1, dtype=torch.int64)
    out[:, :E] = torch.arange(E)
    for l in range(L):
        rep = torch.repeat_interleave(torch.arange(E), logcnt[l] - 1)
        out[l, E:E + rep.numel()] = rep
    return out


def _refine(dev, w, size, cap, phy2log, G, rounds):
    """Moves and swaps off each layer's busiest device while they lower it (vectorised over layers)."""
    L, P = dev.shape
    valid = phy2log >= 0
    rows = torch.arange(L)
    for _ in range(rounds):
        load = torch.zeros(L, G, dtype=torch.float64).scatter_add_(1, dev.clamp(min=0), w * valid)
        used = torch.zeros(L, G, dtype=torch.float64).scatter_add_(1, dev.clamp(min=0), size * valid)
        h = load.argmax(-1)  # [L]
        on_h = valid & (dev == h[:, None])
        k = int(on_h.sum(-1).max())
        if k == 0:
            break
        cand = torch.sort(torch.where(on_h, torch.arange(P), P), dim=-1).values[:, :k]  # slots on h, P = pad
        cand_ok = cand < P
        ci = cand.clamp(max=P - 1)
        wi, si, ei = w.gather(1, ci), size.gather(1, ci), phy2log.gather(1, ci)  # [L, k]
        # expert presence per device, to keep copies on distinct devices
        held = torch.zeros(L, int(phy2log.max().clamp(min=0)) + 1, G, dtype=torch.bool)
        held[rows[:, None].expand(L, P)[valid], phy2log[valid], dev[valid]] = True
        lh = load.gather(1, h[:, None])  # [L, 1]
        # moves i -> g
        g_load, g_used = load[:, None, :], used[:, None, :]  # [L, 1, G]
        fits = (g_used + si[..., None] <= cap[:, None, None] + _EPS) & ~held[rows[:, None], ei]  # [L, k, G]
        fits &= (torch.arange(G)[None, None] != h[:, None, None]) & cand_ok[..., None]
        m_new = torch.maximum(lh[..., None] - wi[..., None], g_load + wi[..., None])
        m_new = torch.where(fits, m_new, torch.inf)
        best_move, arg_move = m_new.view(L, -1).min(-1)
        # swaps i <-> j (j on another device)
        dj = dev[:, None, :]  # [L, 1, P]
        d = wi[..., None] - w[:, None, :]  # [L, k, P]
        lg = load.gather(1, dev.clamp(min=0))[:, None, :]
        ok = valid[:, None, :] & (dj != h[:, None, None]) & (d > _EPS) & cand_ok[..., None]
        ok &= used.gather(1, dev.clamp(min=0))[:, None, :] - size[:, None, :] + si[..., None] <= cap[:, None, None] + _EPS
        ok &= used.gather(1, h[:, None])[..., None] - si[..., None] + size[:, None, :] <= cap[:, None, None] + _EPS
        ej = phy2log.clamp(min=0)[:, None, :]
        ok &= ~held[rows[:, None, None], ei[..., None], dev.clamp(min=0)[:, None, :]] | (ej == ei[..., None])
        ok &= ~held[rows[:, None, None], ej, h[:, None, None]] | (ej == ei[..., None])
        ok &= ej != ei[..., None]
        s_new = torch.where(ok, torch.maximum(lh[..., None] - d, lg + d), torch.inf)
        best_swap, arg_swap = s_new.view(L, -1).min(-1)
        improve_m = best_move < lh[:, 0] - _EPS
        improve_s = best_swap < lh[:, 0] - _EPS
        if not (improve_m | improve_s).any():
            break
        use_swap = improve_s & (best_swap < best_move)
        use_move = improve_m & ~use_swap
        for sel, arg, width in ((use_move, arg_move, G), (use_swap, arg_swap, P)):
            r = rows[sel]
            if r.numel() == 0:
                continue
            i = ci[r, arg[sel] // width]
            other = arg[sel] % width
            if width == G:
                dev[r, i] = other
            else:
                gj = dev[r, other].clone()
                dev[r, other] = h[r]
                dev[r, i] = gj
    return dev


def place(phy2log: torch.Tensor, slot_weight: torch.Tensor, slot_size: torch.Tensor, capacity: torch.Tensor,
          num_devices: int, refine_rounds: int = 64, orig_cap=None, pin=None,
          pin_dev=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Put every layer's slots on G devices: ``phy2log, slot_weight, slot_size [L, P]`` (-1 / 0 pad),
    ``capacity [L]`` room per device in slot-size units -> ``(slot_device [L, P] (-1 pad), ok [L] bool)``.

    Heaviest slot first (ties: larger, then lower slot id) onto the least-loaded device with room
    that does not hold its expert (if none, any device with room; ties: lowest device). A layer
    whose slots do not fit gets ``ok = False`` (its devices are then partial). Then ``_refine``
    (not on rows with ``orig_cap [L]``: at most that many of slots 0..E-1, the originals, per device;
    nor on ``pin [L]`` rows, whose originals stay on ``pin_dev [L, E]``).
    """
    L, P = phy2log.shape
    G = int(num_devices)
    valid = phy2log >= 0
    w = slot_weight.double() * valid
    size = slot_size.double() * valid
    cap = torch.as_tensor(capacity, dtype=torch.float64).expand(L)
    E1 = int(phy2log.max()) + 1 if valid.any() else 1
    order = torch.argsort(-(w + 1e-9 * size / size.max().clamp_min(1)), dim=-1, stable=True)
    dev = torch.full((L, P), -1, dtype=torch.int64)
    load = torch.zeros(L, G, dtype=torch.float64)
    used = torch.zeros(L, G, dtype=torch.float64)
    count = torch.zeros(L, G, dtype=torch.float64)
    held = torch.zeros(L, E1, G, dtype=torch.bool)
    ok = torch.ones(L, dtype=torch.bool)
    rows = torch.arange(L)
    E0 = int((phy2log == torch.arange(P)).long().cumprod(-1).sum(-1).min())  # slots 0..E0-1: the originals
    origs = torch.zeros(L, G)
    ocap = None if orig_cap is None else torch.as_tensor(orig_cap, dtype=torch.float64).expand(L)
    pinned = None if pin is None else torch.as_tensor(pin).expand(L)
    if pin is not None and pin_dev is None:
        pin_dev = (torch.arange(E0) * G // max(E0, 1)).expand(L, E0)
    scale = load.new_tensor(1e-12) * w.sum(-1).clamp_min(1)[:, None]
    for i in range(P):
        s = order[:, i]
        v = valid[rows, s]
        e = phy2log[rows, s].clamp(min=0)
        sz = size[rows, s]
        room = used + sz[:, None] <= cap[:, None] + _EPS
        if orig_cap is not None:
            room &= (s >= E0)[:, None] | (origs < ocap[:, None])
        if pin is not None:
            home = (torch.arange(G) == pin_dev.gather(1, e[:, None].clamp(max=pin_dev.shape[1] - 1))) & room
            room = torch.where((pinned & (s < E0))[:, None], home, room)
        fresh = room & ~held[rows, e]
        pick = torch.where(fresh.any(-1, keepdim=True), fresh, room)
        ok &= pick.any(-1) | ~v
        key = torch.where(pick, load + scale * count, torch.inf)
        g = key.argmin(-1)
        put = v & pick.any(-1)
        r = rows[put]
        gp = g[put]
        dev[r, s[put]] = gp
        load[r, gp] += w[r, s[put]]
        used[r, gp] += sz[put]
        count[r, gp] += 1
        held[r, e[put], gp] = True
        origs[r, gp] += (s[put] < E0).double()
    free = ok if ocap is None else ok & torch.isinf(ocap)
    if pinned is not None:
        free = free & ~pinned
    if refine_rounds and free.any():
        idx = rows[free]
        dev[idx] = _refine(dev[idx].clone(), w[idx], size[idx], cap[idx], phy2log[idx], G, refine_rounds)
    return dev, ok


def build_layout(weight: torch.Tensor, num_slots: torch.Tensor, num_devices: int,
                 slot_size=None, capacity=None, refine_rounds: int = 64, spread=False, pin=False, pin_dev=None):
    """Replicate ``weight [L, E]`` to ``num_slots [L]`` slots and place them on G devices.

    ``slot_size(phy2log [L, P]) -> [L, P]`` and ``capacity [L]``: memory per slot and per device
    (default: every slot size 1, room ``ceil(P / G)`` slots). Returns ``phy2log [L, P]``,
    ``slot_device [L, P]`` (both -1 padded) and ``ok [L]``.
    """
    L, E = weight.shape
    num_slots = torch.as_tensor(num_slots, dtype=torch.int64).expand(L)
    logcnt = replicate(weight, num_slots)
    phy2log = slots_of(logcnt)
    valid = phy2log >= 0
    w = torch.where(weight.sum(-1, keepdim=True) > 0, weight.double(), torch.ones_like(weight, dtype=torch.float64))
    per_copy = (w / logcnt).gather(1, phy2log.clamp(min=0)) * valid
    if slot_size is None:
        size = valid.double()
        cap = torch.ceil(num_slots.double() / num_devices)
    else:
        size, cap = slot_size(phy2log).double() * valid, torch.as_tensor(capacity, dtype=torch.float64).expand(L)
    spread = torch.as_tensor(spread).expand(L)
    dev, ok = place(phy2log, per_copy, size, cap, num_devices, refine_rounds,
                    torch.where(spread, float(math.ceil(E / num_devices)), float("inf")) if spread.any() else None,
                    pin if torch.as_tensor(pin).any() else None, pin_dev)
    return phy2log, dev, ok


def _fill(w, T, num_slots, G, first_size, rep_size, cap, orig_cap=None, pin=None, pin_dev=None, even=None,
          star=None):
    """One level-``T`` fill (see ``fill_layout``). Returns ``(expert, device, first [L, S]`` (-1 pad), ``ok [L])``."""
    L, E = w.shape
    S = int(num_slots.max())
    rows = torch.arange(L)
    # experts that fit whole below T first (heaviest first), then the ones that must split
    split = w > T[:, None]
    order = torch.argsort(split.double() * (w.max() * 4) - w, dim=-1, stable=True)
    rem = T[:, None].expand(L, G).clone()
    used = torch.zeros(L, G, dtype=torch.float64)
    # one spare column S takes the writes of rows that place nothing this round
    expert = torch.full((L, S + 1), -1, dtype=torch.int64)
    device = torch.full((L, S + 1), -1, dtype=torch.int64)
    first = torch.zeros(L, S + 1, dtype=torch.bool)
    n = torch.zeros(L, dtype=torch.int64)
    ok = torch.ones(L, dtype=torch.bool)
    tiny = 1e-9 * T
    # room held back from the whole experts for the pieces of the split ones (else the many
    # cold experts can take every slot of the devices a hot expert needs)
    pieces = torch.where(split, torch.ceil(w / T[:, None]) + 1, 0).sum(-1)
    cap_whole = (cap - torch.ceil(pieces / G) * rep_size.max(-1).values)[:, None] + _EPS
    cap_all = cap[:, None] + _EPS
    w_o, f_o, r_o, whole_o = (x.gather(1, order) for x in (w, first_size, rep_size, ~split))
    gid = torch.arange(G)
    originals = torch.zeros(L, G)
    if pin is not None:
        pinned = torch.as_tensor(pin).expand(L)
        pin_o = (order * G // E) if pin_dev is None else pin_dev.gather(1, order)
    ocap = torch.full((L, 1), float("inf")) if orig_cap is None else torch.as_tensor(orig_cap).double().expand(L)[:, None]
    # even rows: at most ceil(whole / G) whole experts per device, so the cold ones do not take
    # the slots the split ones need (cardinality-tight layouts: few slots per device)
    wcap = torch.full((L, 1), float("inf"))
    if even is not None:
        ev = torch.as_tensor(even).expand(L)
        st = torch.zeros(L, dtype=torch.bool) if star is None else torch.as_tensor(star).expand(L) & ev
        wcap = torch.where(ev, torch.ceil((~split).sum(-1).double() / G), float("inf"))[:, None]
    wholes = torch.zeros(L, G)
    r_min = rep_size.min(-1).values
    for j in range(E):
        e, rest, whole = order[:, j], w_o[:, j].clone(), whole_o[:, j]
        held = torch.zeros(L, G, dtype=torch.bool)
        is_first = torch.ones(L, dtype=torch.bool)
        for _ in range(G):
            active = ok & ((rest > tiny) | is_first)
            if not active.any():
                break
            sz = torch.where(is_first, f_o[:, j], r_o[:, j])[:, None]
            fit = used + sz <= cap_all
            room = fit & ~held & ((rem > tiny[:, None]) | is_first[:, None])
            if orig_cap is not None:
                room &= ~is_first[:, None] | (originals < ocap)
            if pin is not None:  # pinned rows: each original stays on its standard-EP device
                home = (gid == pin_o[:, j][:, None]) & fit
                room = torch.where((pinned & is_first)[:, None], home, room)
            kept = room & (used + sz <= cap_whole)
            free = whole & kept.any(-1) & (~pinned if pin is not None else True)
            if even is not None:
                room = torch.where((whole & is_first & ev)[:, None], room & (wholes < wcap), room)
                free &= ~ev
            room = torch.where(free[:, None], kept, room)
            has = room.any(-1)
            full = n >= num_slots
            ok &= ~active | (has & ~full)
            go = active & ok
            key = torch.where(room, rem, -torch.inf)
            if even is not None:
                # split experts on even rows: a piece that fills a device whose last slot it takes
                # first (nothing else could use that slot), and a remainder where a slot is left
                # for the next expert to close the gap (McNaughton's wrap with slot limits)
                last = used + sz + r_min[:, None] > cap_all
                fills = rem <= rest[:, None] + tiny[:, None]
                Tc = T[:, None]
                wrap = key + torch.where(fills & last, 4.0, torch.where(~fills & ~last, 2.0, 0.0)) * Tc
                # star rows: a remainder into the device with the least room that takes it and whose
                # last slot it takes (best fit; no later split expert can share that device), else
                # pieces that fill the devices with the most room; a remainder that leaves a slot
                # free (which would chain this expert to the next) only when nothing else is left
                best = torch.where(~fills & last, 5 * Tc - rem, torch.where(fills, 3 * Tc + rem, rem))
                key = torch.where((ev & ~whole)[:, None] & room, torch.where(st[:, None], best, wrap), key)
            g = key.argmax(-1)
            hot = (gid == g[:, None]) & go[:, None]
            piece = torch.minimum((rem * hot).sum(-1).clamp(min=0), rest)
            col = torch.where(go, n, S)[:, None]
            expert.scatter_(1, col, e[:, None])
            device.scatter_(1, col, g[:, None])
            first.scatter_(1, col, is_first[:, None])
            rem -= hot * piece[:, None]
            used += hot * sz
            held |= hot
            if orig_cap is not None:
                originals += hot * is_first[:, None]
            if even is not None:
                wholes += hot * (is_first & whole)[:, None]
            rest -= piece * go
            is_first &= ~go
            n += go.long()
            # the next pass's ``active`` without its pass: a row still on its first piece now has ok False
            if not bool((ok & (rest > tiny)).any()):
                break
        ok &= ~((rest > tiny) & ok)
    expert, device, first = expert[:, :S], device[:, :S], first[:, :S]
    return expert, device, first, ok, used


def fill_layout(weight: torch.Tensor, num_slots: torch.Tensor, num_devices: int, first_size=None, replica_size=None,
                capacity=None, fill_all: bool = False, iters: int = 8, spread=False, pin=False, pin_dev=None,
                tight=False, star=False):
    """Replicas and devices for **load-aware** dispatch: fill every device up to one level T.

    ``weight [L, E]``; ``num_slots [L]`` the most slots a layer may use; ``first_size`` /
    ``replica_size [L, E]`` memory of an expert's original slot / of each extra copy, ``capacity
    [L]`` room per device (default: size 1 each and ``ceil(num_slots / G)`` slots per device).
    Experts that fit whole below T go first, heaviest first, each onto the device with the most
    level left below T (longest processing time first); then the experts heavier than T are
    poured, heaviest first, into the devices with the most level left, one slot per piece (they
    fill the emptiest devices up to T and leave one remainder: McNaughton's wrap-around rule, with
    room limits), and T is the lowest level that
    fits, by bisection between ``total / G`` and ``total / G + max weight``. Copies of an expert
    sit on distinct devices. With ``fill_all`` leftover room is filled with extra copies of the
    heaviest per-copy experts (engines need every slot). Returns ``phy2log [L, P]``,
    ``slot_device [L, P]`` (-1 pad; slots 0..E-1 the originals), ``level [L]`` (T / mean) and
    ``ok [L]`` (False: nothing fits, even the top level). ``spread``: at most ``ceil(E / G)``
    originals per device, as on standard EP (experts cold in calibration are not stacked on one
    device, where a shifted mix that heats them would meet them together). ``pin [L]``: rows whose
    originals stay on their device in ``pin_dev [L, E]`` (default standard EP, ``e * G // E``; only
    the extra copies are placed): with load-aware dispatch such a layout is never busier than the
    pinned one without copies, whatever the traffic. ``tight [L]``: rows for few slots per device
    (at most ``ceil(whole / G)`` unsplit experts per device; split experts wrapped McNaughton-style
    into the slots left, each remainder closed by the next split expert: a chain of split experts
    linked device to device). ``star [L]`` (tight rows only): split experts' remainders best-fit
    into devices whose last slot they take instead, so split experts seldom share a device and each
    forms a star with the unsplit experts beside it. The load-aware split balances a star in one
    pour, a chain only over many Gauss-Seidel rounds (Zipf s=1, E=64, G=64, 2 slots per device:
    the wrap fills to 1.004 x mean yet the 12-round split reaches 1.064; the star fill 1.008 and 1.007).
    """
    w = weight.double()
    L, E = w.shape
    G = int(num_devices)
    w = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))
    num_slots = torch.as_tensor(num_slots, dtype=torch.int64).expand(L)
    if first_size is None:
        first_size = replica_size = torch.ones(L, E, dtype=torch.float64)
        capacity = torch.ceil(num_slots.double() / G)
    first_size, replica_size = first_size.double(), replica_size.double()
    cap = torch.as_tensor(capacity, dtype=torch.float64).expand(L)
    mean = w.sum(-1) / G
    lo, hi = mean.clone(), mean + w.max(-1).values
    spread = torch.as_tensor(spread).expand(L)
    oc = torch.where(spread, float(math.ceil(E / G)), float("inf")) if spread.any() else None
    pin = torch.as_tensor(pin).expand(L)
    pn = pin if pin.any() else None
    tight = torch.as_tensor(tight).expand(L)
    tt = tight if tight.any() else None
    star = torch.as_tensor(star).expand(L) & tight
    mode = dict(even=tt, star=star if star.any() else None)
    best = _fill(w, hi, num_slots, G, first_size, replica_size, cap, oc, pn, pin_dev, **mode)
    two = _fill(w, 2 * mean, num_slots, G, first_size, replica_size, cap, oc, pn, pin_dev, **mode)  # a tighter bracket when it fits
    feas = two[3] & (2 * mean < hi)
    hi = torch.where(feas, 2 * mean, hi)
    best = tuple(torch.where(feas.view(L, *([1] * (b.dim() - 1))), g, b) for g, b in zip(two, best))
    for _ in range(iters):
        mid = (lo + hi) / 2
        got = _fill(w, mid, num_slots, G, first_size, replica_size, cap, oc, pn, pin_dev, **mode)
        feas = got[3]
        hi = torch.where(feas, mid, hi)
        lo = torch.where(feas, lo, mid)
        best = tuple(torch.where(feas.view(L, *([1] * (b.dim() - 1))), g, b) for g, b in zip(got, best))
    expert, device, first, ok, used = best
    if fill_all:
        expert, device = _fill_rest(w, expert, device, used, num_slots, G, replica_size, cap)
        first = first | False
    # slots 0..E-1: each expert's first piece, in expert order; then the other pieces by expert
    valid = expert >= 0
    key = torch.where(first & valid, expert, torch.where(valid, E + expert, 2 * E + 1))
    key = key * expert.shape[1] + torch.arange(expert.shape[1])
    order = torch.argsort(key, dim=-1)
    phy2log, dev = expert.gather(1, order), device.gather(1, order)
    firsts = first.gather(1, order)
    assert bool(((phy2log[ok, :E] == torch.arange(E)) & firsts[ok, :E]).all()), "every expert needs a slot"
    P = int((phy2log >= 0).sum(-1).max())
    return phy2log[:, :P], dev[:, :P], hi / mean.clamp_min(1e-300), ok


def _fill_rest(w, expert, device, used, num_slots, G, replica_size, cap):
    """Extra copies into the room left: lowest device with room first, the heaviest per-copy expert
    not yet on it."""
    L, S = expert.shape
    rows = torch.arange(L)
    E = w.shape[1]
    n = (expert >= 0).sum(-1)
    held = _held(expert, device, E, G)  # [L, E, G]
    cnt = held.sum(-1).double().clamp(min=1)
    small = replica_size.min(-1).values
    for _ in range(S):
        room = used + small[:, None] <= cap[:, None] + _EPS  # [L, G]
        go = (n < num_slots) & room.any(-1)
        if not go.any():
            break
        g = torch.where(room, torch.arange(G), G).argmin(-1).clamp(max=G - 1)
        free = ~held[rows, :, g] & (used[rows, g][:, None] + replica_size <= cap[:, None] + _EPS)  # [L, E]
        score = torch.where(free, w / cnt, -torch.inf)
        e = score.argmax(-1)
        fits = torch.isfinite(score.max(-1).values)
        used[rows[go & ~fits], g[go & ~fits]] = cap[go & ~fits] + 1  # nothing fits there: close the device
        go &= fits
        r = rows[go]
        expert[r, n[go]] = e[go]
        device[r, n[go]] = g[go]
        used[r, g[go]] += replica_size[r, e[go]]
        held[r, e[go], g[go]] = True
        cnt[r, e[go]] += 1
        n += go.long()
    return expert, device


def _held(expert, device, E, G):
    L, S = expert.shape
    held = torch.zeros(L, E * G + 1, dtype=torch.bool)
    flat = torch.where(expert >= 0, expert.clamp(min=0) * G + device.clamp(min=0), E * G)
    held.scatter_(1, flat, True)
    return held[:, :-1].view(L, E, G)
