"""The 3-bit i-quants IQ3_XXS and IQ3_S: groups of 4 weights as points of a lattice codebook, with signs.

A super-block covers 256 elements in 8 sub-blocks of 32; each group of 4 consecutive elements is one codebook
point g, with a sign per element: x = db * g[k] * (-1 if sign bit k else 1).

Block structs (little-endian):

    IQ3_XXS | d:f16 | qs:64 B | scales_signs:8 x u32 |                            98 B, 3.0625 bits/weight
    IQ3_S   | d:f16 | qs:64 B | qh:8 B | signs:32 B | scales:4 B |                110 B, 3.4375 bits/weight

IQ3_XXS: qs[j] is the point (of 256, magnitudes in {4, 12, ..., 52, 62}) of group j; sub-block i's word
w = scales_signs[i] = [ scale (31..28) | 4 x 7-bit sign indices (27..0) ]: bits 7k+6..7k index iq2's KSIGNS for
elements 8k..8k+7 of the sub-block; db = d * (0.5 + (w >> 28)) / 2.

IQ3_S: the point (of 512, magnitudes in {1, 3, ..., 15}) of group j is qs[j] | (bit j % 8 of qh[j // 8]) << 8;
byte m of signs holds the signs of elements 8m..8m+7 (bit k for element 8m + k); the 4-bit scale s of
sub-block i is nibble i % 2 of scales[i // 2] (low first); db = d * (1 + 2 s).

The codebooks (llama.cpp's iq3xxs_grid, iq3s_grid) are below in compact form, one uint16 a point with its 4
coordinates as 3-bit indices into the magnitudes. The planes are the fields.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.quant.block import Field, Format
from realm_jax.quant.common import codebook
from realm_jax.quant.iq2 import KSIGNS, group_scale, sign_bits, signed

F16, U8, U32 = (np.dtype(t) for t in (np.float16, np.uint8, np.uint32))
QK_K = 256
MAGNITUDES_XXS = (4, 12, 20, 28, 36, 44, 52, 62)
MAGNITUDES_S = (1, 3, 5, 7, 9, 11, 13, 15)

_GRID_XXS = (
    "00000200040009000b000f0010001200190022003b003d004100430048004a005100550058005a0061006c0078008000"
    "8200840089009000920099009b009f00a900af00bd00c100c700c800ca00d500f8000b011f0124012f013b013d014101"
    "47015a016a019d01b401c801cc01ce01e301f1010102030208020a021102130218021a021c0227022802400242024902"
    "500252028102830288028a0291029802ba02c002c202d002d902e602f60201030503280350035403660379038503d203"
    "e0030004020409040b041004120416041904220441044304450448044a04510458047304770478048004820489048f04"
    "900492049f04a004ad04c104c804cc04f804fc041d052b054305570561057c05c105c305ce05e505010608060a061106"
    "1306280635063a064006420650065906640666068106830688069506aa06ba06c906db06180727073a07400746075207"
    "6d078c079e07b307db07f00704080f081d081f082b082f087c0890089f08a008b008b608c708e5080409290934095509"
    "63097809c509c809ca09d8090a0a210a380a400a460a560a6d0a8c0a9a0aba0ac20aeb0a080b130b170b3a0b420b590b"
    "a80bd40be20b140c240c260c340c510c710c8f0cb40cd80cde0c240d450d6a0d9b0dc30dd10d030e050e070e080e1a0e"
    "2a0e560e600e8a0ea50eaa0ec00ecd0edb0ef00e110f210f400f420f540f980f"
)
_GRID_S = (
    "00000100020005000700080009000a000c000e001000110015001b00200022002500270029002b003000320039003c00"
    "3f004000410042004400480049004d0050005300570059005d006400710075007a00800081008500870088008b008e00"
    "9100950098009c00a200a500a700a900ab00b800bb00c300c900cd00d000d200d900db00de00e400e800ea00f700f900"
    "fd0000010b010f01110114011a012001230129013801420144015001520156015b0161016501670176017b0186018901"
    "8b019901aa01b901c001c201c401d001d201d601db01e801ec010002010202020402080209020b020d020f0210021202"
    "19021c021e022c022e0231023a02400241024302460248024c02510258025b02610268026a0278027e0280028a028d02"
    "8f02900294029a02a002a302ad02b002ba02c102c402c702c802cb02d102d702d802dc02e102f202f802030305030a03"
    "0c0319031b032203260328032c03410348034b03510358035a036903900394039703a403a603c103c303c803ca03d103"
    "dd03e103f203f8030004010403040504070408040a040c040e0411041304170418041a0421042304250428042a043704"
    "38043b043d044004420448044b044f045204550459045c04620469048104840487049104930498049f04a104ab04af04"
    "b904bc04c004c204c504c904d204d404d904db04e204e804f60401050705100513051a051d0521053a053d0544054905"
    "52055f0560056b0578058005820587059105ad05b105c505c905d605d805e305e805020609060b060d060f0612061906"
    "1b061d062206240627062906330639064106430645064c0651065306600670067a067e0680068a0690069a069c06a806"
    "c106c806cc06d106d306d706d806e106e306e706ed06fb06030709070e07120719072a0730073407410748074a075507"
    "5a0764076e077b078e07a107c107c307d007d207dd07000804080a081008140817081a08210828083808420847084908"
    "4b08520858085d08630869086d088108830888088d0891089b08a008af08b208b808c408c908cb08d008d208d908dd08"
    "0009020914091f092009390945094709510972098b099c09b009c809cd09d809e309e909020a080a0c0a120a200a240a"
    "270a2a0a360a3c0a410a430a450a4a0a510a5a0a7a0a800a890a930a980a9e0aab0ac20ac70ac80ad70ae40ae90af50a"
    "fb0a010b040b100b1a0b260b4a0b560b690b6b0ba20bc20bc40bd20b090c0b0c0d0c190c1b0c300c400c500c570c740c"
    "8a0c9c0ca20cad0cb20cb80cc00ccc0cd10ce00c150d230d320d400d430d5c0d700d850da00dc90dcb0d000e040e070e"
    "100e120e1e0e200e2c0e320e420e490e540e630e650e810e840e880e8e0e910e980ea90ec20eda0edd0eeb0e010f050f"
    "0b0f100f280f520f620f820f990fc00f"
)
GRID_XXS = codebook("".join(_GRID_XXS), MAGNITUDES_XXS, 3, 4, np.uint8)  # [256, 4]
GRID_S = codebook("".join(_GRID_S), MAGNITUDES_S, 3, 4, np.uint8)  # [512, 4]


def tile_iq3_xxs(p, *, exact: bool = False) -> jax.Array:
    del exact  # products by powers of two and one rounded product: nothing to contract
    w = p["scales_signs"].reshape(*p["scales_signs"].shape[:-1], -1, 8)  # [..., n, 8]
    db = group_scale(p["d"], w >> 28, 0.5)
    signs = jnp.asarray(KSIGNS)[(w[..., None] >> jnp.array([0, 7, 14, 21], jnp.uint32)) & 0x7F]  # [..., n, 8, 4]
    points = jnp.asarray(GRID_XXS)[p["qs"].astype(jnp.int32)].reshape(*signs.shape, 8)  # 2 points a sign byte
    return signed(db[..., None, None], points, sign_bits(signs))


def tile_iq3_s(p, *, exact: bool = False) -> jax.Array:
    del exact
    s = (p["scales"][..., None] >> jnp.array([0, 4], jnp.uint8)) & 0xF  # [..., n*4, 2]
    s = s.reshape(*p["d"].shape, 8).astype(jnp.float32)
    db = p["d"].astype(jnp.float32)[..., None] * (1 + 2 * s)  # 1 + 2s is an exact small integer
    high = sign_bits(p["qh"]).reshape(*p["qs"].shape).astype(jnp.int32)
    idx = p["qs"].astype(jnp.int32) | (high << 8)
    points = jnp.asarray(GRID_S)[idx].reshape(*p["d"].shape, 8, 4, 8)
    negative = sign_bits(p["signs"]).reshape(*points.shape)
    return signed(db[..., None, None], points, negative)


FORMATS = (
    Format("IQ3_XXS", 18, QK_K, 98, (Field("d", F16, 1), Field("qs", U8, 64), Field("scales_signs", U32, 8)),
           tile_iq3_xxs),
    Format("IQ3_S", 21, QK_K, 110,
           (Field("d", F16, 1), Field("qs", U8, 64), Field("qh", U8, 8), Field("signs", U8, 32),
            Field("scales", U8, 4)), tile_iq3_s),
)
