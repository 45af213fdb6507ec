import pytest

from orca2.answers import extract_answer, gold_value, infer_answer_type, is_correct


@pytest.mark.parametrize(
    "response, expected",
    [
        ("so she has 18 left.\n#### 18", "18"),
        ("The answer is 72.", "72"),
        ("The answer is: 72 apples", "72"),
        ("Final answer: $1,234", "1234"),
        ("We get \\boxed{72}.", "72"),
        ("so x = \\boxed{\\frac{1}{2}}", "1/2"),
        ("The answer is \\boxed{\\dfrac{6}{3}}", "2"),
        ("72 apples", "72"),
        ("1,234", "1234"),
        ("3 + 4 = 7, then 7 * 2 = 14. So 14.", "14"),
        ("The answer is -5.", "-5"),
        ("Answer: 2.50", "2.5"),
        ("It costs $40.00 in total. The answer is $40.00", "40"),
    ],
)
def test_numbers(response, expected):
    assert extract_answer(response, "number").value == expected


@pytest.mark.parametrize(
    "response",
    [
        "(B)",
        "Answer: B",
        "B)",
        "The answer is (B).",
        "The answer is: B",
        "B",
        "Looking at (A) and (C), neither works. The answer is (B)",
        "I pick option B",
    ],
)
def test_choices(response):
    assert extract_answer(response, "choice").value == "B"
    assert is_correct(response, "(B)")


@pytest.mark.parametrize(
    "response, gold, ok",
    [
        ("Yes", "Yes", True),
        ("yes, it did.", "Yes", True),
        ("The answer is: No", "No", True),
        ("No.", "yes", False),
        ("True", "True", True),
        ("The expression evaluates to False.", "False", True),
        ("true", "False", False),
        ("The answer is: dune kettle raven", "dune kettle raven", True),
        ("Dune Kettle Raven.", "dune kettle raven", True),
        ("The answer is 2021-03-04.", "2021-03-04", True),
        ("invalid", "valid", False),
        ("", "3", False),
    ],
)
def test_yes_no_true_false_text(response, gold, ok):
    assert is_correct(response, gold) is ok


def test_gold_normalisation_and_types():
    assert gold_value("(C)", "choice") == "C" and gold_value("1,000", "number") == "1000"
    assert infer_answer_type("(A)") == "choice" and infer_answer_type("-3") == "number"
    assert infer_answer_type("valid") == "text" and infer_answer_type("No") == "yes_no"
    assert extract_answer("no digits here", "number").value is None


@pytest.mark.parametrize(
    "response,expected",
    [
        ("So the answer is 9 * 2 = 18", "18"),  # a worked line after the marker: its result, not its first operand
        ("Answer: 16 - 3 - 4 = 9 eggs", "9"),
        ("The answer is $5 x 3 = $15 = 15 dollars.", "15"),
        ("The answer is 2.5 * 4 = 10.", "10"),
        ("The answer is 18, because 9 = 3 * 3", "18"),  # an '=' in the explanation is not the result
        ("The answer is 12. Check: 2+2=4", "12"),
    ],
)
def test_a_marked_worked_line_gives_its_result(response, expected):
    assert extract_answer(response, "number").value == expected


@pytest.mark.parametrize(
    "response,expected",
    [
        ("She answered 12 questions and got 5 wrong, so 7 were right.", "7"),  # 'answered' is not a marker
        ("To answer this, we need 3 steps. 4 + 4 = 8, then 8 * 2 = 16", "16"),  # nor is 'to answer this'
        ("Answers vary. The total is 30", "30"),
    ],
)
def test_the_word_answer_is_a_marker_only_with_is_or_a_colon(response, expected):
    assert extract_answer(response, "number").value == expected


def test_a_spaced_slash_is_division_not_a_fraction():
    assert extract_answer("It takes 520 / 3 days", "number").value == "3"  # the last number, never '520/3'
    assert extract_answer("The answer is 520 / 3 days", "number").value == "520"
    assert extract_answer("The answer is 3/4", "number").value == "3/4"  # a written fraction stays one


def test_score_is_the_one_check():
    from orca2.answers import score

    s = score("Answer: 16 - 3 - 4 = 9 eggs", "9")
    assert s.correct and s.value == "9" and s.expected == "9" and s.method == "answer-is" and s.answer_type == "number"
    assert not score("no idea", "(B)").correct and score("(B) it is", "(B)").correct
    assert not score("42", None).correct  # no gold: never correct


@pytest.mark.parametrize(
    "response,expected",
    [
        ("The answer is eighteen dollars.", "18"),
        ("Answer: twenty-five", "25"),
        ("The answer is two hundred and five apples.", "205"),
        ("Final answer: one thousand three hundred", "1300"),
        ("The answer is a dozen eggs.", "12"),
        ("The answer is two dozen.", "24"),
        ("The answer is zero.", "0"),
        ("The answer is Seventy Two", "72"),
        ("The answer is 18, not nineteen.", "18"),  # digits first
    ],
)
def test_a_marked_answer_in_number_words(response, expected):
    assert extract_answer(response, "number").value == expected


def test_number_words_are_not_read_outside_a_marked_answer():
    assert extract_answer("I have one idea but no result.", "number").value is None
    assert extract_answer("so there are 7 left, one for each day", "number").value == "7"


@pytest.mark.parametrize(
    "response,expected",
    [
        ("Answer: 16 - 3 - 4 = 9 eggs, and 9 * 2 = $18.", "18"),  # a chain that goes on: its last result
        ("The answer is 3 + 4 = 7, so 7 * 10 = 70 cents", "70"),
        ("Answer: 5 + 3 = 8 apples. (Check: 8 - 3 = 5)", "8"),  # a check after the sentence is not the chain
        ("Answer: 16 - 3 - 4 = 9 eggs", "9"),
    ],
)
def test_a_final_answer_given_as_a_chain_is_its_last_result(response, expected):
    assert extract_answer(response, "number").value == expected


@pytest.mark.parametrize(
    "response,gold,ok",
    [
        ("The answer is −5.", "-5", True),
        ("The answer is −5.", "5", False),
        ("Answer: −2.5", "−2.5", True),
        ("(b)", "(B)", True),
        ("Answer: b", "(B)", True),
        ("The answer is (c).", "(C)", True),
        ("answer: (d)", "(d)", True),
        ("a) is wrong, so the answer is b)", "(B)", True),
        ("I choose option c", "(C)", True),
        ("The answer is 0.5", "1/2", True),
        ("The answer is 1/2", "0.5", True),
        ("The answer is 2/4", "1/2", True),
        ("The answer is 1/3", "0.33", False),
        ("The licence is CC0", "0", False),
        ("We released it under GPLv3.", "3", False),
    ],
)
def test_more_scoring_classes(response, gold, ok):
    assert is_correct(response, gold) is ok


def test_gold_types_of_fractions_and_lower_case_choices():
    assert (
        infer_answer_type("1/2") == "number"
        and infer_answer_type("(b)") == "choice"
        and infer_answer_type("−3") == "number"
    )
    assert gold_value("(b)", "choice") == "B"


@pytest.mark.parametrize(
    "reply,expected",
    [
        ("It is public domain.\nThe answer is: CC0", "cc0"),
        ("Take the old road.\nThe answer is: Route 66", "route 66"),
        ("9 eggs a day for 2 days.\nThe answer is: 9 * 2 = 18", "18"),
        ("The answer is 18 eggs.", "18"),
        ("The answer is $1,250.", "1250"),
        ("The answer is (B).", "B"),
        ("The answer is: yes", "yes"),
    ],
)
def test_a_reference_answer_is_typed_by_what_it_looks_like(reply, expected):
    from orca2.answers import reference_answer

    assert reference_answer(reply) == expected
