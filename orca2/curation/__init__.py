"""Curation shared by the stages that keep or drop records: leak audit (erase), exact and near deduplication and
decontamination against eval sets (erase, instruct)."""
