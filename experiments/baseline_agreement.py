"""The yardsticks beside a policy's closed-loop figures: the score and expert agreement of the random
and the noisy expert players, graded exactly as `walkthrough play` grades a policy (each step against
the noise-free expert that serves at once).

    python experiments/baseline_agreement.py --game Pong --episodes 10 --max-seconds 180
"""

import argparse
import json
from collections import Counter

import numpy as np

from walkthrough.actions import ALE_ACTIONS
from walkthrough.games import AtariGame, ExpertPlayer, PersistentRandomPlayer


def grade(player_cls, game: str, episodes: int, max_seconds: float, fps: float = 30.0) -> dict:
    scores, agreements, wanted, agreed_on = [], [], Counter(), Counter()
    for seed in range(episodes):  # seeds 0.., as play's default evaluation
        env = AtariGame(game, seed=seed, fps=fps, max_seconds=max_seconds)
        env.reset(seed)
        player = player_cls(env, seed=seed)
        judge = ExpertPlayer.judge(env)
        done, score, agreed = False, 0.0, 0
        while not done:
            action, expert = player.act(env), judge.act(env)
            wanted[ALE_ACTIONS[expert]] += 1
            agreed_on[ALE_ACTIONS[expert]] += action == expert
            agreed += action == expert
            _, reward, done = env.step_ale(action)
            score += reward
        scores.append(score)
        agreements.append(agreed / env.steps)
    return {"mean": float(np.mean(scores)), "std": float(np.std(scores)),
            "expert_agreement": float(np.mean(agreements)),
            "expert_agreement_by_action": {k: agreed_on[k] / n for k, n in sorted(wanted.items())}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--game", default="Breakout")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=180.0)
    args = parser.parse_args(argv)
    result = {name: grade(cls, args.game, args.episodes, args.max_seconds)
              for name, cls in (("random", PersistentRandomPlayer), ("expert", ExpertPlayer))}
    for name, r in result.items():
        print(f"{args.game} {name}: {r['mean']:.1f} +- {r['std']:.1f}, agreement with the expert "
              f"{r['expert_agreement']:.3f}, by action", {k: round(v, 3) for k, v in r["expert_agreement_by_action"].items()})
    print(json.dumps({"game": args.game, **result}))
    return result


if __name__ == "__main__":
    main()
