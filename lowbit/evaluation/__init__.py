"""Evaluation: perplexity, agreement with the float model, per-layer error, size."""

from lowbit.evaluation.agreement import AgreementResult, agreement_from_logits, classifier_agreement, classifier_logits
from lowbit.evaluation.embeddings import EncoderAgreement, encoder_agreement, wikipedia_sentences
from lowbit.evaluation.layers import LayerRow, format_table, layer_table, sqnr_db
from lowbit.evaluation.perplexity import PerplexityProtocol, PerplexityResult, fitting_protocol, perplexity
from lowbit.io.manifest import artifact_size
from lowbit.nn.size import SizeReport, model_size

__all__ = [
    "PerplexityProtocol",
    "PerplexityResult",
    "perplexity",
    "fitting_protocol",
    "AgreementResult",
    "classifier_agreement",
    "classifier_logits",
    "agreement_from_logits",
    "EncoderAgreement",
    "encoder_agreement",
    "wikipedia_sentences",
    "LayerRow",
    "layer_table",
    "format_table",
    "sqnr_db",
    "SizeReport",
    "model_size",
    "artifact_size",
]
