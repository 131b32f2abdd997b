import torch
from faircalib.kernels import cutlass_w4a8
e4m3 = torch.float8_e4m3fn
gen = torch.Generator(device="cuda").manual_seed(0)
n, k = 512, 1024
G = k // 128
w8 = torch.randint(-15, 16, (n, k), generator=gen, device="cuda").to(e4m3)
def ref(a8, a_s, w_s):
    parts = torch.einsum("mgk,ngk->mng", a8.double().view(-1, G, 128), w8.double().view(n, G, 128))
    return (parts * w_s.double()).sum(-1) * a_s.double()[:, None]
for label, ws_kind, as_kind in [("ones", 0, 0), ("ws only", 1, 0), ("as only", 0, 1), ("both", 1, 1)]:
    for config in range(4):
        for m in (7, 100, 256, 1000):
            a8 = (torch.randn(m, k, generator=gen, device="cuda") * 100).to(e4m3)
            a_s = 10 ** (3 * torch.rand(m, generator=gen, device="cuda") - 3) if as_kind else torch.ones(m, device="cuda")
            w_s = 10 ** (3 * torch.rand(n, G, generator=gen, device="cuda") - 5) if ws_kind else torch.full((n, G), 1e-3, device="cuda")
            y = cutlass_w4a8.fp8_group_scaled_mm(a8, a_s, w8, w_s, config).double()
            r = ref(a8, a_s, w_s)
            err = (y - r).abs() / r.abs().amax(1, keepdim=True)
            i = int(err.argmax()); mi, ni = divmod(i, n)
            rel_elem = float(((y - r).abs() / r.abs().clamp(min=1e-30)).median())
            print(f"{label:8s} c{config} m={m:5d} maxerr/rowmax={float(err.max()):.2e} at (m={mi}, n={ni}) y={float(y[mi,ni]):.4g} ref={float(r[mi,ni]):.4g} median rel={rel_elem:.1e} rowmax={float(r.abs()[mi].max()):.3g}")
print("--- error against the sum of |products| (floating accumulation's natural scale)")
for config in range(4):
    for m in (7, 100, 256, 1000):
        a8 = (torch.randn(m, k, generator=gen, device="cuda") * 100).to(e4m3)
        a_s = 10 ** (3 * torch.rand(m, generator=gen, device="cuda") - 3)
        w_s = 10 ** (3 * torch.rand(n, G, generator=gen, device="cuda") - 5)
        y = cutlass_w4a8.fp8_group_scaled_mm(a8, a_s, w8, w_s, config).double()
        r = ref(a8, a_s, w_s)
        absparts = torch.einsum("mgk,ngk->mng", a8.double().abs().view(-1, G, 128), w8.double().abs().view(n, G, 128))
        mag = (absparts * w_s.double()).sum(-1) * a_s.double()[:, None]
        e = (y - r).abs()
        print(f"c{config} m={m} max err/sum|terms| {float((e / mag).max()):.2e}  max err/(|ref| + 1e-3 sum) {float((e / (r.abs() + 1e-3 * mag)).max()):.2e}")
