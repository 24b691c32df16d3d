"""Per-atom features of the published TBG models (docs/model.md, "Atom encodings").

Alanine-dipeptide style (``encode_atoms``): one class per atom, except that the three hydrogens of a methyl
group (a carbon bonded to exactly three hydrogens) share one class, the index of the group's second
hydrogen in atom order. The one-hot width is the number of atoms (22 for alanine dipeptide), unused
columns stay zero. The published single-molecule model used the openmmtools atom order of Ace-Ala-Nme and
``arange(22)`` with atoms [1,2,3] -> 2, [11,12,13] -> 12, [19,20,21] -> 20, one-hot encoded by torch with
the inferred width max+1 = 21; with the time column that is the "22" of its embedding input. Atoms [1,2,3]
there are the ACE methyl carbon and two of its hydrogens (a quirk of that code, the group is [0,2,3]);
``published_alanine_dipeptide_encoding`` reproduces it bit for bit for checkpoints trained that way.

Transfer style (``encode_transfer``): [residue position one-hot (2), amino acid one-hot (20), atom type
one-hot (54)] = 76 columns for dipeptides.
- Amino-acid order: alphabetical by three-letter code (ALA ARG ASN ASP CYS GLN GLU GLY HIS ILE LEU LYS MET
  PHE PRO SER THR TRP TYR VAL), the order of the published code. Protonation variants map to their amino
  acid (HID/HIE/HIP -> HIS, CYX/CYM -> CYS, ASH -> ASP, GLH -> GLU, LYN -> LYS).
- Atom type = atom name with the trailing digit 1/2/3 removed for hydrogens (except the ring hydrogens
  HD*/HE*/HZ*/HH* of HIS, PHE, TRP, TYR) and for OD*/OE* oxygens. Applied to every atom of the amber14
  templates of the 20 amino acids (internal, N- and C-terminal variants, HID/HIE/HIP) this yields exactly
  54 names; sorted alphabetically they are the published 54-class table (same names, same indices).
- Caps (ACE, NME) are not amino acids: their atoms take the residue position and amino acid of the residue
  they cap, carbonyl C/O and amide N/H keep their backbone types, and the methyl group is typed as the
  alpha-carbon it replaces: methyl carbon -> CA, methyl hydrogens -> HA. So caps need no extra class and
  the encoding stays 76 wide (the rule itself would add "CH3").
Longer peptides need ``n_positions`` >= their number of amino-acid residues (the published model has 2).
"""
from __future__ import annotations

import io
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import mdtraj
import numpy as np
import openmm.app as app
import torch

from tbg.errors import InputError

logger = logging.getLogger("tbg")

AMINO_ACID_ORDER: tuple[str, ...] = ("ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE",
                                     "LEU", "LYS", "MET", "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL")
RESIDUE_ALIASES: dict[str, str] = {"HID": "HIS", "HIE": "HIS", "HIP": "HIS", "HSD": "HIS", "HSE": "HIS",
                                   "HSP": "HIS", "CYX": "CYS", "CYM": "CYS", "ASH": "ASP", "GLH": "GLU",
                                   "LYN": "LYS"}
CAPS: tuple[str, ...] = ("ACE", "NME")
RING_RESIDUES = frozenset({"HIS", "PHE", "TRP", "TYR"})
TRANSFER_WIDTH = 76  # encode_transfer of dipeptides: 2 residue positions + 20 amino acids + 54 atom types
PUBLISHED_ALA2_WIDTH = 21  # published_alanine_dipeptide_encoding
PUBLISHED_ALA2_CLASSES: tuple[int, ...] = (0, 2, 2, 2, 4, 5, 6, 7, 8, 9, 10, 12, 12, 12, 14, 15, 16, 17, 18,
                                           20, 20, 20)

# The 54 names the rule gives on the amber14 templates (tests re-derive them from the force field XML).
_DEFAULT_TYPE_NAMES: tuple[str, ...] = (
    "C", "CA", "CB", "CD", "CD1", "CD2", "CE", "CE1", "CE2", "CE3", "CG", "CG1", "CG2", "CH2", "CZ", "CZ2",
    "CZ3", "H", "HA", "HB", "HD", "HD1", "HD2", "HE", "HE1", "HE2", "HE3", "HG", "HG1", "HG2", "HH", "HH1",
    "HH2", "HZ", "HZ2", "HZ3", "N", "ND1", "ND2", "NE", "NE1", "NE2", "NH1", "NH2", "NZ", "O", "OD", "OE",
    "OG", "OG1", "OH", "OXT", "SD", "SG")


def _md_topology(topology: app.Topology | mdtraj.Topology) -> mdtraj.Topology:
    if isinstance(topology, mdtraj.Topology):
        return topology
    if isinstance(topology, app.Topology):
        return mdtraj.Topology.from_openmm(topology)
    raise TypeError(f"expected an OpenMM or mdtraj Topology, got {type(topology).__name__}")


def canonical_residue(name: str) -> str:
    """Residue name with protonation variants mapped to their amino acid."""
    return RESIDUE_ALIASES.get(name, name)


def atom_type_name(residue: str, atom: str) -> str:
    """The naming rule of the published code (see module docstring); ``residue`` is canonical."""
    if atom.startswith("H") and atom[-1] in "123" and not (residue in RING_RESIDUES and atom[:2] in
                                                          ("HD", "HE", "HZ", "HH")):
        atom = atom[:-1]
    if atom[:2] in ("OD", "OE"):
        atom = atom[:-1]
    return atom


def _cap_type_name(residue: str, atom: str, element: str) -> str:
    """Type of a cap atom: backbone types for the amide/carbonyl, CA/HA for the methyl group."""
    if residue == "ACE":
        if atom in ("C", "O"):
            return atom
        return "CA" if element == "C" else "HA"
    # NME: the methyl carbon is "C" in OpenMM topologies and "CH3" in PDB/amber template naming
    if atom in ("N", "H"):
        return atom
    return "CA" if element == "C" else "HA"


def default_atom_types() -> dict[str, int]:
    """Our 54-class atom-type table (name -> index), identical to the published one (see module doc)."""
    return {name: i for i, name in enumerate(_DEFAULT_TYPE_NAMES)}


def template_atom_types(forcefield_files: tuple[str, ...] = ("amber14-all.xml",)) -> list[str]:
    """Re-derive the sorted type names from the force field's residue templates (for tests and docs)."""
    from tbg.chem.forcefield import forcefield  # noqa: PLC0415

    templates = forcefield(tuple(forcefield_files))._templates
    names = set()
    for aa in AMINO_ACID_ORDER:
        variants = ("HID", "HIE", "HIP") if aa == "HIS" else (aa,)
        for var in variants:
            for prefix in ("", "N", "C"):
                for atom in templates[prefix + var].atoms:
                    names.add(atom_type_name(aa, atom.name))
    return sorted(names)


# Data-only constructors an ``np.save``d object array (and numpy integer scalars) need; nothing else loads.
_SAFE_GLOBALS = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                           ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                           ("numpy", "ndarray"), ("numpy", "dtype")})


class _TableUnpickler(pickle.Unpickler):
    """Refuses every global except the numpy array/scalar/dtype constructors: a table is data, never code."""

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an atom-type table")


def load_atom_types(path: str | Path) -> dict[str, int]:
    """Read a published atom-type table (pickled dict, e.g. ``atom_types_ecoding.npy``) safely.

    Accepts a plain pickle of a dict or a NumPy .npy file holding a 0-d object array with the dict (as the
    published ``np.save`` wrote it; ``np.load(allow_pickle=True)`` would execute any code in such a file).
    The pickle stream goes through a restricted unpickler that resolves only numpy's array, dtype and
    scalar constructors; the result must be a dict of str -> integer.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"atom-type table not found: {path}")
    raw = path.read_bytes()
    if raw.startswith(b"\x93NUMPY"):
        fh = io.BytesIO(raw)
        version = np.lib.format.read_magic(fh)
        shape, _, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                           else np.lib.format.read_array_header_2_0(fh))
        if dtype != np.dtype(object) or shape != ():
            raise ValueError(f"{path}: expected a 0-d object array holding a dict, got {dtype} {shape}")
        payload = fh.read()
    else:
        payload = raw
    try:
        table = _TableUnpickler(io.BytesIO(payload)).load()
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a plain atom-type table: {err}") from err
    if isinstance(table, np.ndarray) and table.shape == () and table.dtype == object:
        table = table.item()
    if not isinstance(table, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, np.integer)) and not isinstance(v, bool)
            for k, v in table.items()):
        raise ValueError(f"{path}: expected a dict of str -> int, got {type(table).__name__}")
    table = {k: int(v) for k, v in table.items()}
    _check_table(table, str(path))
    return table


def _check_table(table: Mapping[str, int], origin: str) -> None:
    if not table:
        raise ValueError(f"atom-type table {origin} is empty")
    bad = [k for k, v in table.items() if not 0 <= v < len(table)]
    if bad:
        raise ValueError(f"atom-type table {origin}: indices out of range 0..{len(table) - 1} for {bad}")


def _resolve_table(atom_types: Mapping[str, int] | str | Path | None) -> dict[str, int]:
    if atom_types is None:
        return default_atom_types()
    if isinstance(atom_types, (str, Path)):
        return load_atom_types(atom_types)
    table = dict(atom_types)
    _check_table(table, "given")
    return table


def atom_type_indices(topology: app.Topology | mdtraj.Topology,
                      atom_types: Mapping[str, int] | str | Path | None = None) -> np.ndarray:
    """Atom-type index of every atom [N]; KeyError-style ValueError naming unknown residues/atoms."""
    top = _md_topology(topology)
    table = _resolve_table(atom_types)
    out = np.empty(top.n_atoms, dtype=np.int64)
    unknown = []
    for atom in top.atoms:
        res = canonical_residue(atom.residue.name)
        if res in CAPS:
            name = _cap_type_name(res, atom.name, atom.element.symbol)
        elif res in AMINO_ACID_ORDER:
            name = atom_type_name(res, atom.name)
        else:
            raise ValueError(f"unknown residue {atom.residue.name!r} (residue {atom.residue.index}); "
                             f"known: {', '.join(AMINO_ACID_ORDER + CAPS)} and variants {sorted(RESIDUE_ALIASES)}")
        if name not in table:
            unknown.append(f"{atom.residue.name}{atom.residue.index}:{atom.name} (type {name!r})")
            continue
        out[atom.index] = table[name]
    if unknown:
        raise ValueError(f"atom names without an atom type: {', '.join(unknown)}")
    return out


def residue_positions(topology: app.Topology | mdtraj.Topology) -> tuple[np.ndarray, np.ndarray]:
    """(position in the peptide, amino-acid index) of every atom; caps take those of their neighbour."""
    top = _md_topology(topology)
    residues = list(top.residues)
    canon = [canonical_residue(r.name) for r in residues]
    for r, c in zip(residues, canon):
        if c not in AMINO_ACID_ORDER and c not in CAPS:
            raise ValueError(f"unknown residue {r.name!r} (residue {r.index}); known: "
                             f"{', '.join(AMINO_ACID_ORDER + CAPS)} and variants {sorted(RESIDUE_ALIASES)}")
    amino = [i for i, c in enumerate(canon) if c in AMINO_ACID_ORDER]
    if not amino:
        raise ValueError("topology has no amino-acid residue")
    position, aa = {}, {}
    for k, i in enumerate(amino):
        position[i], aa[i] = k, AMINO_ACID_ORDER.index(canon[i])
    for i, c in enumerate(canon):
        if c in CAPS:  # ACE caps the next amino acid, NME the previous one
            step = 1 if c == "ACE" else -1
            j = i + step
            while 0 <= j < len(canon) and j not in position:
                j += step
            if not 0 <= j < len(canon):
                raise ValueError(f"cap {residues[i].name} (residue {i}) has no amino acid to cap")
            position[i], aa[i] = position[j], aa[j]
    pos = np.array([position[a.residue.index] for a in top.atoms], dtype=np.int64)
    acid = np.array([aa[a.residue.index] for a in top.atoms], dtype=np.int64)
    return pos, acid


def encode_transfer(topology: app.Topology | mdtraj.Topology,
                    atom_types: Mapping[str, int] | str | Path | None = None, *,
                    n_positions: int = 2) -> torch.Tensor:
    """Transfer-model features [N, n_positions + 20 + n_types] (76 for dipeptides), float32 one-hot."""
    table = _resolve_table(atom_types)
    types = atom_type_indices(topology, table)
    pos, acid = residue_positions(topology)
    if pos.max() >= n_positions:
        raise ValueError(f"peptide has {pos.max() + 1} amino-acid residues but the encoding has only "
                         f"n_positions={n_positions} residue-position classes")
    n_types = max(table.values()) + 1
    return torch.cat([_one_hot(pos, n_positions), _one_hot(acid, len(AMINO_ACID_ORDER)),
                      _one_hot(types, n_types)], dim=1)


def atom_classes(topology: app.Topology | mdtraj.Topology) -> np.ndarray:
    """Class of every atom [N] for ``encode_atoms``: its index; methyl hydrogens share one class."""
    top = _md_topology(topology)
    if top.n_bonds == 0 and top.n_atoms > 1:  # methyl groups are found through bonds: refuse to guess
        raise ValueError("topology has no bonds; load it from a PDB with standard residues or CONECT records")
    classes = np.arange(top.n_atoms, dtype=np.int64)
    hydrogens: dict[int, list[int]] = {}
    for a, b in top.bonds:
        for heavy, h in ((a, b), (b, a)):
            if heavy.element.symbol == "C" and h.element.symbol == "H":
                hydrogens.setdefault(heavy.index, []).append(h.index)
    for hs in hydrogens.values():
        if len(hs) == 3:
            hs = sorted(hs)
            classes[hs] = hs[1]
    return classes


def encode_atoms(topology: app.Topology | mdtraj.Topology, *, n_classes: int | None = None) -> torch.Tensor:
    """Alanine-dipeptide style features [N, n_classes] (default N), float32 one-hot (see module doc)."""
    classes = atom_classes(topology)
    n = len(classes) if n_classes is None else n_classes
    if classes.max() >= n:
        raise ValueError(f"n_classes={n} is too small for {len(classes)} atoms")
    return _one_hot(classes, n)


def published_alanine_dipeptide_encoding() -> torch.Tensor:
    """The published alanine-dipeptide features [22, 21] (openmmtools atom order, see module doc)."""
    return _one_hot(np.asarray(PUBLISHED_ALA2_CLASSES), 21)


def _one_hot(index: np.ndarray, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(index, dtype=torch.long), n).to(torch.float32)


def features_for_width(topology: app.Topology | mdtraj.Topology, n_features: int,
                       encoding: Literal["auto", "atoms", "transfer"] = "auto") -> torch.Tensor:
    """Atom features [N, n_features] of ``topology`` for a model whose embedding takes ``n_features``
    (+ time) inputs, e.g. a checkpoint's.

    ``encoding="auto"`` chooses by width: TRANSFER_WIDTH (76) = ``encode_transfer``; N (the number of atoms) =
    ``encode_atoms`` (one class per atom); PUBLISHED_ALA2_WIDTH (21) for 22 atoms = the published
    alanine-dipeptide encoding (valid only in the openmmtools atom order of Ace-Ala-Nme). Any other width
    raises InputError. "atoms" and "transfer" force that encoding.
    """
    if encoding not in ("auto", "atoms", "transfer"):
        raise ValueError(f"encoding must be 'auto', 'atoms' or 'transfer', got {encoding!r}")
    n_atoms = _md_topology(topology).n_atoms
    if encoding == "transfer" or (encoding == "auto" and n_features == TRANSFER_WIDTH):
        return encode_transfer(topology)
    if encoding == "atoms" or (encoding == "auto" and n_features == n_atoms):
        return encode_atoms(topology, n_classes=n_features)
    if encoding == "auto" and n_features == PUBLISHED_ALA2_WIDTH and n_atoms == 22:
        logger.warning("using the published alanine-dipeptide encoding: valid only for the openmmtools atom "
                       "order of Ace-Ala-Nme (the order of the published data)")
        return published_alanine_dipeptide_encoding()
    raise InputError(
        f"the checkpoint expects {n_features} atom features, which fits neither the transfer encoding "
        f"({TRANSFER_WIDTH}) nor the per-atom encoding of this {n_atoms}-atom molecule ({n_atoms}); "
        f"check that the topology is the molecule the model was trained on")
