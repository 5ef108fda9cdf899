"""Evaluation: batched greedy answers (the generation engine), per-task exact match and format
compliance, routing statistics."""
from .data import Sample, load_samples
from .generation import answer_samples, eval_engine, generate_answers, prepare
from .metrics import exact_match, routing_stats, score
from .report import comparison_table, report_table
from .run import evaluate, evaluate_model, load_for_eval

__all__ = ["Sample", "answer_samples", "comparison_table", "eval_engine", "evaluate", "evaluate_model",
           "exact_match", "generate_answers", "load_for_eval", "load_samples", "prepare", "report_table",
           "routing_stats", "score"]
