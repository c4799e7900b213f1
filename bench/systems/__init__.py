"""The systems measured side by side: each one's agent, loop or workflow for the same conversation.

Modules here hold what runs in a worker (workflows, activities, agents, graphs); workflow
modules import nothing but temporalio, their framework and `bench.conversation`, since
Temporal's sandbox imports them again. Starting and driving them is `bench.drivers`.
"""
