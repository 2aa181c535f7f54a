"""Every coded concept the encoders write, with where it came from.

Standard codes (SCT, DCM, UCUM) are taken from ``pydicom.sr.codedict.codes``,
which pydicom generates from DICOM PS3.16 (Content Mapping Resource); none is
typed from memory. The comment on each line names the code and, where the
standard lists it in a context group (CID), that group. Where PS3.16 has no
code for a concept (the white-cell classes, the uncertainty and anomaly scores,
the differential's procedure) we use the private coding scheme ``99CYTONODE``
(PS3.16 8.2: designators starting with "99" are private), declared in every
object by :data:`CODING_SCHEME`. ``docs/codes.md`` lists all of them.
"""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from analysis.classes import CellClassValues

PRIVATE_SCHEME = "99CYTONODE"

#: Declares the private scheme in the SOP Common module (PS3.3 C.12.1.1.2.1).
CODING_SCHEME = CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME,
    name="CytoNode private codes",
    responsible_organization="CytoNode project",
)


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


# --- Standard codes (pydicom.sr.codedict, generated from PS3.16) --------------------------
CELL: Code = codes.SCT.Cell  # SCT 4421005 "Cell"; CID 8135 Microscopy Annotation Property Types
ANATOMICAL_STRUCTURE: Code = codes.SCT.AnatomicalStructure  # SCT 91723000; CID 7150 Segmentation Property Categories
SPATIAL_AND_RELATIONAL: Code = codes.SCT.SpatialAndRelationalConcept  # SCT 309825002; CID 7150
MORPHOLOGICALLY_ABNORMAL: Code = codes.SCT.MorphologicallyAbnormalStructure  # SCT 49755003; CID 7150
SALIENCY: Code = codes.DCM.Saliency  # DCM 130404 "Saliency"; CID 7180, CID 218
AREA: Code = codes.SCT.Area  # SCT 42798000 "Area"; CID 7469, CID 7471 Area Measurements
PROBABILITY: Code = codes.DCM.Probability  # DCM 122157 "Probability"; PS3.16 Annex D (DCM lexicon)
ARTIFICIAL_INTELLIGENCE: Code = codes.DCM.ArtificialIntelligence  # DCM 123110; CID 7162 Surface Processing Algorithm Families
PROCESSING_EQUIPMENT: Code = codes.DCM.ProcessingEquipment  # DCM 109102; CID 7005 Contributing Equipment Purposes
SPECIMEN = CodedConcept.from_code(codes.DCM.Specimen)  # DCM 121027 "Specimen"; CID 271 Observation Subject Class
DEVICE = CodedConcept.from_code(codes.DCM.Device)  # DCM 121007 "Device"; CID 270 Observer Type
SLIDE: Code = codes.SCT.Slide  # SCT 1179252003 "Slide"; CID 8103 Anatomic Pathology Specimen Types

# --- Units (pydicom.sr.codedict, UCUM) ----------------------------------------------------
PERCENT: Code = codes.UCUM.Percent  # UCUM "%"; CID 7181 Abstract Multi-dimensional Image Model Component Units
NO_UNITS: Code = codes.UCUM.NoUnits  # UCUM "1" "no units"; CID 7181
SQUARE_MICROMETER: Code = codes.UCUM.SquareMicrometer  # UCUM "um2"; CID 7181
#: UCUM annotation "{cells}": a dimensionless count (UCUM annotations in curly braces equal unit 1).
#: Not in pydicom's table, which holds no per-cell count unit; UCUM allows it by its grammar.
CELLS = CodedConcept(value="{cells}", scheme_designator="UCUM", meaning="cells")

# --- Private codes: no code for these concepts exists in PS3.16 ---------------------------
PROCEDURE_DIFFERENTIAL = _private("WBCDIFF", "White blood cell differential count, peripheral blood smear")
CELL_COUNT = _private("CELLCOUNT", "Number of cells")
CELL_PERCENTAGE = _private("CELLPCT", "Percentage of classified cells")
CI95_LOWER = _private("CI95LOW", "Lower limit of 95% Wilson score confidence interval")
CI95_UPPER = _private("CI95UPP", "Upper limit of 95% Wilson score confidence interval")
REVIEW_COUNT = _private("REVIEWCOUNT", "Number of cells flagged for review")
ABNORMAL_COUNT = _private("ABNCOUNT", "Number of suspected abnormal cells")
UNCERTAINTY = _private("UNCERTAINTY", "Classification uncertainty")
ANOMALY_SCORE = _private("ANOMALY", "Anomaly score")
ANOMALY_MAP = _private("ANOMALYMAP", "Anomaly score map")
REVIEW_REASON = _private("REVIEWREASON", "Reason for review")
ABNORMAL_REASON = _private("ABNREASON", "Reason for suspecting an abnormal cell")
HIGH_UNCERTAINTY = _private("HIGHUNCERTAINTY", "Uncertainty above the calibrated threshold")
HIGH_ANOMALY = _private("HIGHANOMALY", "Anomaly score above the calibrated threshold")
SIGNIFICANT_CLASS = _private("SIGNIFCLASS", "Clinically significant class, always reviewed")
MODELS_DISAGREE = _private("MODELSDISAGREE", "Diffusion classifier and reference model disagree")
OUTSIDE_DOMAIN = _private("OUTSIDEDOMAIN", "Slide outside the validated domain")
INSIDE_DOMAIN = _private("INSIDEDOMAIN", "Slide inside the validated domain")
SLIDE_QUALITY = _private("SLIDEQC", "Slide quality check")

# The differential a haematologist reads (dicom_node.encode.differential): white cells only,
# nucleated red cells per 100 white cells, platelets apart, a note under 100 white cells.
WHITE_CELL_COUNT = _private("WBCCOUNT", "Number of white cells in the differential")
WHITE_CELL_PERCENTAGE = _private("WBCPCT", "Percentage of white cells")
NRBC_PER_100_WBC = _private("NRBCPER100WBC", "Nucleated red cells per 100 white cells")
PLATELETS_SEEN = _private("PLTSEEN", "Platelets seen (estimate)")
UNLIKE_COUNT = _private("UNLIKECOUNT", "Number of flagged cells unlike any training class")
DIFFERENTIAL_NOTE = _private("DIFFNOTE", "Differential note")
FEW_WHITE_CELLS = _private("FEWWBC", "Fewer than 100 white cells: interpret with caution")
#: UCUM unit of a count per 100 white cells, as LOINC writes it (e.g. LOINC 58413-6, NRBC/100 WBC).
PER_100_WBC = CodedConcept(value="/100{WBCs}", scheme_designator="UCUM", meaning="per 100 white blood cells")

#: The eight classes: no white-cell type (neutrophil, ...) is coded in PS3.16.
CLASS_CODES: dict[CellClassValues, CodedConcept] = {
    CellClassValues.NEUTROPHIL: _private("NEUTROPHIL", "Neutrophil"),
    CellClassValues.EOSINOPHIL: _private("EOSINOPHIL", "Eosinophil"),
    CellClassValues.BASOPHIL: _private("BASOPHIL", "Basophil"),
    CellClassValues.LYMPHOCYTE: _private("LYMPHOCYTE", "Lymphocyte"),
    CellClassValues.MONOCYTE: _private("MONOCYTE", "Monocyte"),
    CellClassValues.IG: _private("IG", "Immature granulocyte"),
    CellClassValues.ERYTHROBLAST: _private("ERYTHROBLAST", "Erythroblast"),
    CellClassValues.PLATELET: _private("PLATELET", "Platelet"),
}
