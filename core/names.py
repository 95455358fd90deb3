"""The run vocabulary: every tag, artifact path and state file skinclr writes, defined once.

Runs written by one module are read by others (the report reads the trainer's tags, promotion
reads the sweep's, resume reads the runner's), so each name lives here and nowhere else.
"""
from __future__ import annotations

# The classes of ISIC 2018 Task 3, in the order of its ground-truth columns and of every output.
CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")

# --- MLflow's own tags -------------------------------------------------------------------------
PARENT_TAG = "mlflow.parentRunId"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
NOTE_TAG = "mlflow.note.content"  # the description the UI shows
SOURCE_NAME_TAG = "mlflow.source.name"  # the runs table's Source column
SOURCE_TYPE_TAG = "mlflow.source.type"
KIND_TAG = "mlflow.experimentKind"  # custom_model_development: the UI's model-training view

# --- every run ---------------------------------------------------------------------------------
STAGE_TAG = "skinclr.stage"  # pretrain | finetune | evaluate | report | pipeline | the sweep's stage
COMMAND_TAG = "skinclr.command"  # the command line that made the run (a trial: its sweep's)
RUN_KEY_TAG = "skinclr.run_key"  # hash of the resolved config: finds a run to resume
DEVICE_TAG = "skinclr.device"
PRECISION_TAG = "skinclr.precision"  # what the training step computed in: fp32 | bf16 (train.precision resolved)
EPOCHS_RUN_TAG = "skinclr.epochs_run"
DATA_FINGERPRINT_TAG = "data_fingerprint"  # the images (name, label, size, mtime)
SPLIT_FINGERPRINT_TAG = "split_fingerprint"  # which images were train and which val
LABEL_FINGERPRINT_TAG = "label_fingerprint"  # the labelled subset of the train side (label_fraction < 1)
DATA_ROOT_TAG = "data_root"
DATA_LAYOUT_TAG = "data_layout"
TRAIN_IMAGES_TAG = "skinclr.train_images"
TEST_FINGERPRINT_TAG = "skinclr.test_fingerprint"  # the held-out test side (data.test_fraction > 0)
TEST_IMAGES_TAG = "skinclr.test_images"
# Each side a run reads, logged as an MLflow dataset input with this context (the Dataset column).
DATASET_CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}
TTA_MODES = ("none", "flip", "d4")  # test-time augmentation: 1, 4 or 8 views of each square
DECISION_RULES = ("none", "balanced")  # the argmax, or per-class offsets fitted for balanced accuracy
DECISION_RULE_FILE = "decision_rule.json"  # a model's per-class logit offsets, by class, beside its report
ENSEMBLE_TAG = "skinclr.ensemble"  # an ensemble run's member run ids, comma-separated
TEST_ARTIFACTS = "test"  # a fine-tune's test report: its saved model on the held-out test side, scored once
MISSING_CLASSES_TAG = "skinclr.missing_classes"

# --- fine-tuning -------------------------------------------------------------------------------
INIT_TAG = "skinclr.init"  # scratch | imagenet | runs:/RUN | a path
PRETRAIN_RUN_TAG = "skinclr.pretrain_run_id"  # the pretraining run the backbone came from
BEST_EPOCH_TAG = "skinclr.best_epoch"
EARLY_STOPPED_TAG = "skinclr.early_stopped_at"

# --- evaluation --------------------------------------------------------------------------------
MODEL_URI_TAG = "skinclr.model_uri"
MODEL_RUN_TAG = "skinclr.model_run_id"  # the fine-tune run of the evaluated model
DATA_ROLE_TAG = "skinclr.data_role"  # train | val | test | mixed | unknown (no split to compare with)
ROLE_IMAGES_TAG = "skinclr.{role}_images"  # how many evaluated images were the model's train, val or test

# --- sweeps ------------------------------------------------------------------------------------
SWEEP_PARENT_TAG = "skinclr.sweep"  # marks a sweep's parent run
SWEEP_RUN_TAG = "skinclr.sweep_run_id"  # on a trial (or a run made from one): its sweep's parent run
SWEEP_FOLDER_TAG = "skinclr.sweep_folder"
SEARCH_TAG = "skinclr.search"  # optuna | random | grid
TRIAL_TAG = "skinclr.trial_id"
TRIAL_RESOURCES_TAG = "skinclr.trial_resources"
NODE_TAG = "skinclr.node_ip"  # the Ray node the trial ran on last
SAMPLED_PREFIX = "skinclr.sampled."  # + config key: the value the search gave a trial
STOPPED_BY_TAG = "skinclr.stopped_by"  # asha | early_stop | ... : why a trial ended before its epochs
STOPPED_AT_TAG = "skinclr.stopped_at_epoch"
BEST_TRIAL_TAG = "skinclr.best_trial_id"
BEST_RUN_TAG = "skinclr.best_run_id"  # on a sweep's parent (or a report): its best child run
BEST_PREFIX = "skinclr.best."  # + config key: the best trial's value, on the parent
TRIALS_TAG = "skinclr.trials"
TRIALS_FINISHED_TAG = "skinclr.trials_finished"
SWEEP_STUDY_FILE = "optuna_study.log"  # in an Optuna sweep's folder: its sampler's study (an Optuna journal)
SWEEP_CHARTS = "sweep_charts"  # on a sweep's parent: Optuna's charts of its trials, self-contained HTML
SWEEP_HISTORY_HTML = "optimization_history.html"  # each trial's metric in trial order, and the best so far
SWEEP_IMPORTANCES_HTML = "param_importances.html"  # how much each swept key explains of the metric
SWEEP_PARALLEL_HTML = "parallel_coordinate.html"  # every trial's values and metric, one line each
SWEEP_CHART_FILES = (SWEEP_HISTORY_HTML, SWEEP_IMPORTANCES_HTML, SWEEP_PARALLEL_HTML)

# --- pipelines ---------------------------------------------------------------------------------
PIPELINE_PARENT_TAG = "skinclr.pipeline"  # marks a pipeline's top run
PIPELINE_RUN_TAG = "skinclr.pipeline_run_id"  # on a run the pipeline made: its top run
BEST_PRETRAIN_TAG = "skinclr.best_pretrain_run_id"
BEST_FINETUNE_TAG = "skinclr.best_finetune_run_id"
EVAL_DATA_TAG = "skinclr.eval_data"
EVAL_RUN_TAG = "skinclr.eval_run_id"

# --- reports -----------------------------------------------------------------------------------
REPORT_TAG = "skinclr.report"
REPORT_EXPERIMENTS_TAG = "skinclr.report_experiments"
STUDY_RUN_TAG = "skinclr.study_run_id"

# --- the model registry (model version tags) ---------------------------------------------------
PROMOTION_TAG = "skinclr.promotion"  # pending -> done | failed
SOURCE_RUN_TAG = "skinclr.source_run_id"
METRIC_TAG = "skinclr.metric"
METRIC_VALUE_TAG = "skinclr.metric_value"
VERSION_SPLIT_TAG = "skinclr.split_fingerprint"
VERSION_DATA_TAG = "skinclr.data_fingerprint"
VERSION_COMMIT_TAG = "skinclr.git_commit"

# --- artifacts of a run ------------------------------------------------------------------------
CONFIG_ARTIFACT = "config.yaml"  # the fully resolved config
MODEL_ARTIFACT = "model"  # a fine-tune run's pyfunc folder: runs:/RUN_ID/model
WEIGHTS_FILE = "classifier.pt"  # inside the model folder's artifacts/
META_FILE = "meta.json"  # classes, backbone, image size, aspect: what serving needs besides weights
CONFUSION_PNG = "confusion_matrix.png"
BACKBONE_ARTIFACTS = "checkpoints"  # a pretrain run's backbone state_dicts, what a fine-tune starts from
BACKBONE_BEST = "backbone_best.pt"  # the best monitored epoch's backbone
BACKBONE_LAST = "backbone_last.pt"  # the last epoch's backbone
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_NORMALIZED_CSV = "confusion_matrix_normalized.csv"
CLASSIFICATION_REPORT_CSV = "classification_report.csv"
CLASSIFICATION_REPORT_TXT = "classification_report.txt"

# --- state files on disk -----------------------------------------------------------------------
SWEEP_STATE_FILE = "skinclr_sweep.json"  # in a sweep's folder: what --resume needs
PIPELINE_STATE_FILE = "skinclr_pipeline.json"  # in a pipeline's folder: its run and finished steps
TRIAL_STATE_FILE = "trial.json"  # all a trial's Tune checkpoint holds: its MLflow run and epoch (the runner keeps the state)
INPUTS_FILE = "inputs.json"  # in a sweep's folder: the inputs its driver resolved, which trials open
