"""The arithmetic-chain task's rules, worked by hand: the step labeller, the final answer, the gold reward."""
import pytest

from algorithms.arithmetic_chains import (Chain, chain_of, demonstration, final_answer, gold_reward, prompt_of, splits,
                                          step_labels, value_of)

P = prompt_of(Chain((3, 4, 2, 5), ("+", "*", "-")))          # 3 + 4 * 2 - 5 = 6


def labels(prompt, response):
    return [ok for _, ok in step_labels(prompt, response)]


def test_the_demonstration_is_every_step_right():
    assert demonstration(chain_of(P)) == " 4 * 2 = 8. 3 + 8 = 11. 11 - 5 = 6. The answer is 6."
    assert labels(P, demonstration(chain_of(P))) == [True, True, True]
    assert gold_reward(P, demonstration(chain_of(P)), ended=True) == 1.0


@pytest.mark.parametrize("response, want_labels, want_gold", [
    (" 3 + 4 = 7. 7 * 2 = 14. 14 - 5 = 9. The answer is 9.", [False, False, False], -0.5),  # + before *
    (" 4 * 2 = 9. 3 + 8 = 11. 11 - 5 = 6. The answer is 6.", [False, False, False], 0.5),   # a false equation
    (" 4 * 2 = 8. 4 * 2 = 8. 3 + 8 = 11. 11 - 5 = 6. The answer is 6.", [True, False, True, True], 0.5),  # repeated
    (" 4 * 2 = 8. 11 - 5 = 6. The answer is 6.", [True, False], 0.5),                        # a step skipped
    (" The answer is 6.", [], 0.5),                                                          # no steps at all
    (" 4 * 2 = 8. 3 + 8 = 11. 11 - 5 = 6. The answer is 7.", [True, True, True], -0.5),       # right steps, wrong answer
    (" 4 * 2 = 8. 3 + 8 = 11. 11 - 5 = 6.", [True, True, True], -0.5),                       # no answer sentence
    (" 4 * 2 = 8. Then 3 + 8 = 11. 11 - 5 = 6. The answer is 6.", [True, False, False], 0.5),  # not a bare step
])
def test_wrong_processes_by_hand(response, want_labels, want_gold):
    assert labels(P, response) == want_labels
    assert gold_reward(P, response, ended=True) == want_gold


def test_which_operation_may_come_next():
    two_products = prompt_of(Chain((2, 3, 4, 5), ("*", "+", "*")))               # 2 * 3 + 4 * 5 = 26
    assert labels(two_products, " 4 * 5 = 20. 2 * 3 = 6. 6 + 20 = 26. The answer is 26.") == [True, True, True]
    assert labels(two_products, " 3 + 4 = 7.") == [False]                        # 3 is bound by 2 * 3
    sum_first = prompt_of(Chain((3, 4, 2, 5), ("+", "-", "*")))                  # 3 + 4 - 2 * 5 = -3
    assert labels(sum_first, " 3 + 4 = 7. 2 * 5 = 10. 7 - 10 = -3. The answer is -3.") == [True, True, True]
    assert labels(sum_first, " 4 - 2 = 2.") == [False]                           # 2 is bound by 2 * 5
    left_to_right = prompt_of(Chain((9, 3, 2), ("-", "+")))                      # 9 - 3 + 2 = 8
    assert labels(left_to_right, " 3 + 2 = 5. 9 - 5 = 4. The answer is 4.") == [False, False]
    assert value_of(chain_of(left_to_right)) == 8 and final_answer(" The answer is -3.") == -3


def test_a_reply_that_did_not_end_scores_zero_and_other_prompts_are_refused():
    assert gold_reward(P, demonstration(chain_of(P)), ended=False) == 0.0
    with pytest.raises(ValueError, match="not a prompt of the arithmetic-chain task"):
        chain_of("\n\nHuman: What is 7 plus 5?\n\nAssistant:")


def test_the_splits_are_disjoint_distinct_and_their_own_draws():
    s = splits(0, n_train=300, n_val=50, n_test=50, n_rm=100)
    everything = s["train"] + s["val"] + s["test"] + s["rm"]
    assert len(set(everything)) == len(everything) == 500
    # the reward models' prompts are drawn last: they leave the other splits as they are
    assert {k: v for k, v in s.items() if k != "rm"} == {k: v for k, v in splits(0, 300, 50, 50, 0).items() if k != "rm"}
    assert splits(0, 300, 50, 50, 100) == s and splits(1, 300, 50, 50, 100) != s
    assert all(gold_reward(p, demonstration(chain_of(p)), True) == 1.0 for p in everything)
