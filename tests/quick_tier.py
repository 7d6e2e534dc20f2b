"""The quick tier, for the edit loop: `./dev test --quick` (that is, `pytest -m quick`) runs these.

It finishes in about a minute on the 2-core VM and holds tests of every subpackage of edgefa
(tests/test_quick_tier.py checks both that every subpackage has an entry and that every entry
names a test that exists). The whole suite, `./dev test` (what CI runs), still runs everything:
the slow tests left out here are end-to-end runs (the demo, soak, live links, distributed
training, audits) and exhaustive sweeps.

An entry is a test file (all its tests) or FILE::TEST (every parameter of that test).
"""

QUICK_TIER = {
    "bundle": ["test_bundle.py::test_good_bundle_verifies_and_shows_every_file",
               "test_bundle.py::test_bad_bundle_raises_bundle_error_from_read_bundle",
               "test_bundle.py::test_object_array_is_refused_without_unpickling",
               "test_bundle.py::test_write_bundle_replaces_an_existing_bundle_with_a_whole_new_one",
               "test_bundle.py::test_write_bundle_failing_shape_check_leaves_the_old_bundle_intact"],
    "storage": ["test_checkpoints.py::test_a_crash_at_every_io_point_of_save_state_leaves_the_old_state_or_the_new",
                "test_checkpoints.py::test_a_full_disk_at_every_io_point_of_save_state_keeps_the_old_checkpoints",
                "test_store_faults.py::test_a_start_quarantines_a_bundle_it_cannot_load_and_serves_the_previous_one"],
    "cli": ["test_cli_bad_input.py",
            "test_report_cli.py::test_report_prints_the_table_and_writes_html",
            "test_report_cli.py::test_missing_metrics_is_one_line"],
    "out_folders": ["test_out_folders.py::test_a_same_kind_folder_is_written_over_in_place",
                    "test_out_folders.py::test_a_bundle_folder_is_edgefa_s_only_when_every_file_is",
                    "test_out_folders.py::test_replace_folder_leaves_the_old_bundle_or_the_new_at_every_crash_point",
                    "test_out_folders.py::test_state_holds_only_what_the_device_writes"],
    "without_torch": ["test_no_torch.py"],
    "shared": ["test_data.py", "test_data_cifar.py", "test_preference.py",
               "test_data_mnist1d.py::test_the_spec_takes_a_sample_count",
               "test_runtime.py::test_batch_indices_are_deterministic_permutations_with_a_fixed_batch_size"],
    "models": ["test_models.py::test_bp_rule_is_autograd_and_fa_with_b_equal_w_is_bp",
               "test_models.py::test_every_rule_gives_every_parameter_a_finite_gradient",
               "test_models.py::test_hybrid_is_bp_on_bp_steps_and_dfa_otherwise",
               "test_models.py::test_resmlp_dfa_injects_e_b_at_every_stage_and_blocks_use_their_local_gradient",
               "test_rules_usf_hybrid.py::test_usf_sends_the_error_back_through_the_sign_of_the_weights",
               "test_rules_usf_hybrid.py::test_hybrid_takes_a_true_bp_step_every_kth_step_and_is_dfa_otherwise"],
    "training": ["test_training.py::test_rule_gradients_match_their_definition",
                 "test_training.py::test_checkpoint_roundtrip_keeps_feedback",
                 "test_alignment.py::test_bp_rule_aligns_perfectly",
                 "test_alignment.py::test_every_model_and_rule",
                 "test_alignment.py::test_measurement_leaves_model_and_rng_untouched",
                 "test_preference_train.py::test_two_pass_dfa_gradient_is_the_hand_computed_update",
                 "test_preference_train.py::test_pair_specs_and_splits"],
    "diagnostics": ["test_diagnose.py::test_dfa_gamma_below_one_and_null_near_zero",
                    "test_diagnose.py::test_diagnostics_norms_name_their_dim"],
    "experiments": ["test_experiment_preference.py::test_rule_sigma_and_seed_specs",
                    "test_experiment_preference.py::test_the_table_is_mean_and_sample_std_over_seeds",
                    "test_audit.py::test_bad_audit_specs_are_one_line_without_torch"],
    "exporters": ["test_graphs.py", "test_tensorrt_ready.py",
                  "test_device_preference.py::test_the_run_s_loss_makes_a_preference_bundle",
                  "test_device_preference.py::test_device_pairs_steps_match_the_host",
                  "test_device_penalty.py::test_penalised_step_matches_the_host"],
    "runtime": ["test_runtime.py::test_engine_refuses_a_nan_batch_and_keeps_its_state_byte_identical",
                "test_runtime.py::test_resume_is_bit_identical_to_an_uninterrupted_run",
                "test_runtime.py::test_save_state_crash_mid_write_leaves_the_old_checkpoint_loadable",
                "test_finite_proof.py", "test_parity.py", "test_tensorrt_build.py", "test_tensorrt_engine.py",
                "test_divergence.py::test_lr_10_stops_with_one_line_and_keeps_the_good_checkpoint"],
    "link": ["test_link_protocol.py",
             "test_link_live.py::test_tcp_and_pty_give_the_weights_of_a_local_run",
             "test_link_fuzz.py::test_decoder_on_random_bytes"],
    "profiling": ["test_profiler.py", "test_sensors.py", "test_tegrastats.py"],
    "profile_runs": ["test_bundle_kinds.py::test_profile_runs_on_a_resmlp_and_a_last_k_bundle",
                     "test_bundle_kinds.py::test_profile_refuses_a_preference_bundle_in_one_line"],
    "device_profiles": ["test_device_profiles.py", "test_providers.py",
                        "test_bundle_kinds.py::test_budget_works_on_every_kind",
                        "test_budget.py::test_budget_names_an_unknown_profile"],
    "fpga_sim": ["test_fpga_datapath.py", "test_fpga_cost.py",
                 "test_fpga_cli.py::test_simulate_reports_both_runs_sqnr_overflow_and_zeroed_updates",
                 "test_bundle_kinds.py::test_one_check_guards_the_datapath_the_simulator_the_sweep_and_the_cost_model",
                 "test_fpga_kinds.py::test_cost_of_last_k_counts_only_the_trained_layers",
                 "test_fpga_kinds.py::test_bradley_terry_fixed_point_step_matches_the_runtime"],
    "coverage": ["test_coverage.py::test_readme_holds_exactly_the_generated_table",
                 "test_coverage.py::test_every_gap_has_its_one_line_reason"],
    "report": ["test_report_html.py", "test_report_format.py"],
}
# The checks of the package's structure, in the quick tier whatever changes.
STRUCTURE = ["test_import_graph.py", "test_quick_tier.py"]


def selectors() -> set[str]:
    return {entry for entries in QUICK_TIER.values() for entry in entries} | set(STRUCTURE)


def in_quick_tier(file_name: str, test_name: str, chosen: set[str]) -> bool:
    """Whether test `test_name` (without its parameters) of tests/`file_name` is in the tier."""
    return file_name in chosen or f"{file_name}::{test_name}" in chosen


def files() -> list[str]:
    """The test files the tier draws on: all that `pytest -m quick` needs to collect."""
    return sorted({entry.partition("::")[0] for entry in selectors()})


if __name__ == "__main__":          # ./dev test --quick collects only these files
    print("\n".join(f"tests/{name}" for name in files()))
