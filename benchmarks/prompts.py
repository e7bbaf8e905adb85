"""A fixed chat workload for the throughput benchmark: 32 hand-written, realistic requests
(summaries of pasted text, code explanations, emails, questions on a passage, rewriting,
extraction, planning), and a seeded output-length plan.

After SmolLM2's chat template (which adds its default system prompt, ~30 tokens) the prompts
average ~227 tokens (201–304 each); `output_lengths` draws max_tokens in [64, 256] with a mean
of ~156. Both are deterministic, so runs on different days and engines see the same work.

Beyond 32 requests the list repeats with a "(copy k)" tag at the very start of the user message:
only the shared system-prompt block can then hit the prefix cache, as with the first 32.
"""

from __future__ import annotations

import random

Message = dict[str, str]

PROMPTS: list[str] = [
    # --- summarising pasted text
    "Summarise the following paragraph in three bullet points for a busy manager:\n\n"
    "Over the last quarter our customer support team handled 18,400 tickets, up 22% from the "
    "previous quarter. Median first-response time rose from 2.1 hours to 3.4 hours, mostly because "
    "of the spike after the March pricing change, when ticket volume doubled for two weeks. We hired "
    "four new agents in April, but onboarding takes about six weeks, so they only began closing "
    "tickets on their own in late May. Customer satisfaction dipped from 91% to 86% during the "
    "spike and has since recovered to 89%. The most common topics were billing questions (31%), "
    "login problems (18%) and questions about the new export feature (12%). We recommend adding "
    "a self-service billing page and improving the password reset flow, which together could "
    "remove roughly a third of incoming tickets. Finally, the team lead notes that weekend "
    "coverage is still handled by a single agent, which leaves Monday mornings with a backlog of "
    "about 300 tickets, and asks for budget to hire one part-time weekend agent before the "
    "holiday season starts.",
    "Give me a two-sentence summary of this text, then list the key dates it mentions:\n\n"
    "The town library was founded in 1887 by a group of mill workers who pooled their savings to "
    "buy two hundred books. It moved into its current stone building in 1912, funded partly by a "
    "grant and partly by a bake sale that ran every Saturday for three years. During the flood of "
    "1936 volunteers carried the entire collection to the upper floor overnight. A children's wing "
    "was added in 1968, and in 2004 the library became one of the first in the county to offer "
    "free public internet access. Today it lends more than 90,000 items a year. In 2019 the "
    "library council voted to drop late fees entirely, after a study showed that fines mostly "
    "kept children from poorer families away; returns actually improved the following year. "
    "The building was given listed status in 2021, and a fundraising campaign is now under way "
    "to repair the roof and add a lift so that the upper reading room is accessible to everyone. "
    "The campaign aims to raise 450,000 by the end of next year.",
    "Summarise this meeting transcript excerpt and list the action items with owners:\n\n"
    "Priya: The staging deploy failed again last night because the migration timed out.\n"
    "Tom: That's the index on the orders table. It's 40 million rows now. We should build it "
    "concurrently.\nPriya: Agreed. Can you change the migration today?\nTom: Yes, I'll do it "
    "before lunch.\nAlex: Separately, the on-call rota for next month isn't published yet.\n"
    "Priya: I'll post it by Friday. Also, we need someone to review the new alerting rules.\n"
    "Alex: I can take that, but not before Wednesday.\nTom: One more thing: the disk on the "
    "build server is at 92%. Old artefacts are never cleaned up.\nAlex: We could keep only the "
    "last thirty builds per branch.\nPriya: Sounds reasonable. Tom, can you add a cleanup job?\n"
    "Tom: Sure, but after the migration fix.\nPriya: And the customer asked for the release "
    "notes for version 4.2 by Monday. I'll draft them, Alex please check the list of fixed bugs.\n"
    "Alex: Will do.\nPriya: Fine. Let's meet again Thursday.",
    "Condense this product review into a short pros and cons list:\n\n"
    "I've used this espresso machine every morning for about five months. The build quality is "
    "excellent - the steel body feels solid and the portafilter is heavy. It heats up in under "
    "a minute, which I love on workday mornings. The steam wand is powerful enough to make decent "
    "microfoam once you get the hang of it. On the downside, the water tank is small and needs "
    "refilling every two or three days, the drip tray is shallow and overflows if you forget it, "
    "and the machine is louder than I expected. Customer service replaced a faulty gasket quickly, "
    "though. Overall I'd buy it again, but only if you have space on the counter. One more "
    "thing worth knowing: the pressure gauge is mostly decorative, and the included tamper is "
    "plastic and too small for the basket, so budget for a proper 58 mm tamper. The grinder is "
    "not built in, which I actually prefer, because you can upgrade it separately. Descaling is "
    "simple and the machine reminds you when it is due, roughly every six weeks with hard water.",
    # --- explaining code
    "Explain what this Python function does, step by step, and point out any bugs:\n\n"
    "```python\ndef merge_intervals(intervals):\n    intervals.sort()\n    merged = []\n"
    "    for start, end in intervals:\n        if merged and start <= merged[-1][1]:\n"
    "            merged[-1][1] = max(merged[-1][1], end)\n        else:\n"
    "            merged.append([start, end])\n    return merged\n```\n\n"
    "Also tell me its time complexity and whether it modifies its input. It is called like this "
    "from our scheduling service:\n\n```python\nbusy = merge_intervals([(9, 10), (9.5, 11), "
    "(13, 14)])\nfor start, end in busy:\n    print(f'busy {start}-{end}')\n```\n\n"
    "and sometimes it raises a TypeError that I don't understand.",
    "What does this SQL query return? Explain each clause in plain English.\n\n"
    "```sql\nSELECT c.name, COUNT(o.id) AS orders, SUM(o.total) AS revenue\nFROM customers c\n"
    "LEFT JOIN orders o ON o.customer_id = c.id AND o.created_at >= DATE '2024-01-01'\n"
    "GROUP BY c.name\nHAVING COUNT(o.id) > 3\nORDER BY revenue DESC\nLIMIT 10;\n```\n\n"
    "The tables look like this: customers(id integer primary key, name text, country text, "
    "created_at timestamp) and orders(id integer primary key, customer_id integer references "
    "customers, total numeric(10, 2), status text, created_at timestamp). Two customers can "
    "have the same name. Would the result change if I moved the date condition from the JOIN "
    "into a WHERE clause? And is grouping by name a problem here?",
    "I'm new to JavaScript. Can you explain what this code prints and why?\n\n"
    "```javascript\nfor (var i = 0; i < 3; i++) {\n  setTimeout(() => console.log(i), 100);\n}\n"
    "for (let j = 0; j < 3; j++) {\n  setTimeout(() => console.log(j), 100);\n}\n```\n\n"
    "I ran it in the browser console and the first loop printed 3 three times, while the second "
    "printed 0, 1, 2. My tutorial said var and let are 'almost the same', so I'm confused. "
    "Could you also show how people wrote the first loop correctly before let existed, for "
    "example with an immediately invoked function, and explain closures along the way?",
    "Review this bash script and suggest improvements for safety and readability:\n\n"
    "```bash\n#!/bin/bash\ncd $1\nfor f in `ls *.log`; do\n  gzip $f\n  mv $f.gz /backup/\ndone\n"
    "rm -rf /tmp/$2\necho done\n```\n\nThe script is run nightly by cron with a directory and a "
    "scratch folder name as arguments. Last week it was run by hand without arguments and it "
    "deleted more than we wanted, and some log files with spaces in their names were never "
    "compressed. We'd also like it to skip files modified in the last hour, because the "
    "application may still be writing to them, and to write a line to syslog when it finishes. "
    "For reference, the server runs Ubuntu 22.04, the logs are around 2 GB a night, and the backup "
    "folder is an NFS mount that is occasionally unavailable. If the mount is missing, the script "
    "should stop with a clear error instead of filling the local disk. Please show the improved "
    "script in full.",
    "Explain this Rust snippet to someone who knows Python but not Rust:\n\n"
    "```rust\nfn longest<'a>(x: &'a str, y: &'a str) -> &'a str {\n    if x.len() > y.len() { x } "
    'else { y }\n}\n\nfn main() {\n    let a = String::from("hello");\n    let result;\n    {\n'
    '        let b = String::from("hi");\n        result = longest(a.as_str(), b.as_str());\n'
    '    }\n    println!("{}", result);\n}\n```\n\nWhy does it not compile? The compiler '
    'says "`b` does not live long enough" and points at the inner block. In Python I would '
    "just return one of the strings and never think about it. What is the lifetime 'a actually "
    "telling the compiler, and what are two ways to change main so it compiles?",
    "What is the difference between these two Python snippets, and which one should I use for a "
    "list of a million numbers?\n\n```python\n# A\ntotal = 0\nfor x in numbers:\n    total += x * x\n\n"
    "# B\ntotal = sum(x * x for x in numbers)\n```\n\nA colleague also suggested a third "
    "option:\n\n```python\n# C\nimport numpy as np\narr = np.asarray(numbers)\n"
    "total = int((arr * arr).sum())\n```\n\nbut warned that it can give a different answer "
    "for very large integers. Why would that happen, and how would you measure which version "
    "is fastest on my machine? "
    "For context, the numbers come from a CSV export of sensor readings, so they are floats most of "
    "the time but occasionally arrive as strings like '12.5' that someone forgot to convert. I'd "
    "like an answer that covers readability first and speed second.",
    # --- writing emails and messages
    "Write a polite email to my landlord. The kitchen tap has been leaking for two weeks, I "
    "reported it by phone on the 3rd and nobody came. I'd like it fixed this week and I'm "
    "available Tuesday or Thursday afternoon. Keep it firm but friendly, under 150 words. "
    "Some context: the tenancy agreement says repairs are reported to the letting agent, but "
    "the agent closed last month and the landlord, Mr Hughes, asked us to contact him directly. "
    "Water has started to damage the cupboard under the sink, and I've put a bowl under the "
    "pipe. I don't want to sound accusatory, because he has been a good landlord for four years, "
    "but I want a clear date. Sign it from Sam Carter, flat 3. "
    "Please also suggest a subject line. If possible, mention that I'm happy to let a plumber in "
    "with my own key if I'm at work, so the visit doesn't have to depend on my schedule, and that I "
    "have photos of the damage if he needs them for the insurance.",
    "Draft a short message to my team announcing that our weekly sync moves from Monday 10:00 to "
    "Tuesday 14:00 starting next week, because two people now work part-time on Mondays. Ask "
    "anyone who can't make the new slot to tell me by Friday. The tone should be casual. "
    "Also mention that the meeting stays at 30 minutes, that the video link doesn't change, "
    "and that we'll rotate who takes notes, starting with me. If it fits, add a line saying "
    "that the shared agenda document is still open for topics until the evening before. "
    "Some people on the team are in a different time zone, one hour ahead, so please show the new "
    "time for them too. Finish with a short friendly line, nothing too corporate, and don't use "
    "exclamation marks more than once.",
    "Write a cover letter opening paragraph for a junior data analyst position at a regional "
    "hospital. I have a degree in statistics, one year of experience cleaning survey data in R and "
    "Python, and I volunteered at a hospice for two years. I want to sound motivated but not "
    "over the top. The job advert asks for someone who can 'turn messy operational data into "
    "clear dashboards for clinical staff' and mentions that the team is moving from Excel "
    "reports to Power BI. I've used Tableau at university but not Power BI. I found the advert "
    "through a former lecturer who works in the hospital's research office. "
    "I'd like the paragraph to connect the hospice volunteering to working with clinical staff, "
    "without making it sound like I'm using it. Please give me two versions: one more formal and one "
    "a bit more personal, each around 90 words. "
    "The hospital is a teaching hospital in a mid-sized city, and the team lead's name is Dr Evans, "
    "so address the letter to her rather than to 'Sir or Madam'.",
    "Help me reply to this customer email. We can offer a replacement or a full refund, but not "
    'both.\n\nCustomer: "I ordered the blue backpack (order 55812) three weeks ago. It arrived '
    "with a broken zip and one strap was stitched on crooked. I've been a customer for years and "
    "this is really disappointing. I'd like a replacement and some compensation for the trouble.\""
    "\n\nOur policy: returns are free with a prepaid label, replacements ship within two working "
    "days once the return is scanned, and refunds take three to five days. The blue backpack is "
    "back in stock. I can offer a 10% discount code on a future order as a goodwill gesture, but "
    "nothing else. Please keep the reply under 180 words and sign it from Jordan, Customer Care. "
    "The customer's name is Mrs Patel. She sounded upset rather than angry, so the reply should "
    "acknowledge the inconvenience first, then set out the two options clearly, and finally explain "
    "the next steps for whichever she chooses.",
    "Write a thank-you note to a colleague, Maria, who stayed late three evenings last week to help "
    "me finish the quarterly report after my laptop died. Mention that her pivot table trick saved "
    "us hours. Keep it warm and brief. She's quite private and doesn't like public praise, so "
    "this is a direct message rather than a post in the team channel. I'd also like to offer to "
    "cover her Friday support shift next month, since she mentioned she wants a long weekend. "
    "We usually write to each other informally. "
    "If you can, suggest two alternative openings for the note so I can choose the one that sounds "
    "more like me, and keep each version under 80 words. "
    "For background, Maria works in the finance team, not mine, so she had no obligation to help at "
    "all, and she also showed me how to rebuild the lookup tables when the formulas broke at "
    "midnight.",
    "I need to decline a wedding invitation from an old university friend because it clashes with "
    "my sister's graduation abroad. Write a kind message that explains this, congratulates them, "
    "and suggests meeting up for dinner after they return from their honeymoon. Their names "
    "are Leo and Anna, the wedding is on 14 June in Edinburgh, and my sister graduates in "
    "Melbourne the same weekend after six years of study, so I can't miss it. I'd like to send "
    "a gift from their registry as well, and I want them to know I'm genuinely sorry, without "
    "the message becoming long or over-apologetic. "
    "Leo and I shared a flat for three years and he was my best man's witness, so it has to feel "
    "personal. Please write it as a card message, not an email, and suggest a short alternative I "
    "could send as a text message today before the card arrives.",
    # --- questions on a passage
    "Read the passage and answer the questions.\n\nPassage: Honeybees communicate the location of "
    "food sources through the waggle dance. A forager returning to the hive moves in a figure-eight "
    "pattern, waggling its abdomen during the straight central run. The angle of that run relative "
    "to vertical indicates the direction of the food relative to the sun, and the duration of the "
    "waggle indicates the distance: roughly one second of waggling corresponds to about a kilometre. "
    "Other bees follow the dancer closely and pick up the scent of the flowers on its body.\n\n"
    "Questions: 1) What does the angle of the dance encode? 2) How do bees judge distance? "
    "3) What other information do followers get? 4) Why might a dance performed inside a dark "
    "hive still work as a map outside? Please answer each in one or two sentences and say which "
    "sentence of the passage supports your answer.",
    "Based only on the text below, was the project on schedule? Explain your reasoning.\n\n"
    "The bridge renovation began in February with a planned completion in October. Demolition of "
    "the old deck finished two weeks early. However, a shipment of steel girders was delayed by "
    "five weeks due to a strike at the port, and heavy rain in June halted concrete pouring for "
    "another ten days. The contractor added a night shift in July to recover time. As of the end "
    "of August, the engineers estimated the remaining work at nine weeks. The contract includes a "
    "penalty of 5,000 per day for every day beyond 31 October, but allows extensions for "
    "strikes that are outside the contractor's control. The city council has asked for a "
    "revised timeline by mid-September, and local businesses near the bridge have complained "
    "that the diversion is costing them customers.",
    "Here is a passage from a history textbook. Answer: who benefited most from the change, and why?"
    "\n\nIn the late eighteenth century, the enclosure acts allowed landowners to fence off common "
    "fields that villagers had used for grazing and gathering firewood for generations. Larger, "
    "consolidated farms could adopt new crop rotations and selective breeding, and agricultural "
    "output rose substantially. Many smallholders, however, lost access to the land they depended "
    "on and moved to growing towns in search of work, where they became the labour force of the "
    "early factories. Historians still disagree about the overall balance: some emphasise the "
    "gains in food production that supported a rapidly growing population, while others stress "
    "the loss of customary rights and independence for rural families, and the harsh conditions "
    "in the towns where they ended up. Parliament, whose members were largely landowners "
    "themselves, passed thousands of individual enclosure acts over a few decades.",
    "Answer the question using the FAQ below. If the answer isn't there, say so.\n\nFAQ:\n"
    "- Returns are accepted within 30 days with a receipt.\n- Sale items can be exchanged but not "
    "refunded.\n- Gift cards never expire.\n- Online orders can be returned in store or by post; "
    "postage is free for members.\n- We price-match identical items from major retailers within 7 "
    "days of purchase.\n\nQuestion: I bought a jacket on sale online 10 days ago and I'm a member. "
    "Can I get my money back by sending it in the post? I still have the receipt email, the "
    "tags are attached, and I'd prefer the money to go back to my card rather than to a gift "
    "card. If I can't get a refund, what are my options, and do I have to pay the postage?",
    # --- rewriting, extraction, classification
    "Rewrite this paragraph so that a ten-year-old can understand it:\n\nInflation is the rate at "
    "which the general level of prices for goods and services rises, eroding purchasing power. "
    "Central banks attempt to limit inflation, and avoid deflation, in order to keep the economy "
    "running smoothly. They typically do this by adjusting interest rates: higher rates make "
    "borrowing more expensive, which tends to slow spending and ease price increases. Lower "
    "rates do the opposite: they encourage households and firms to borrow and spend, which can "
    "help during a downturn but may push prices up if the economy is already running at full "
    "capacity. Most central banks aim for an inflation rate of around two percent a year, "
    "because a small, predictable rise in prices is considered healthier than stable or falling "
    "prices. Please keep the rewrite under 120 words and use one everyday example.",
    "Extract all people, organisations and places from this news snippet and return them as JSON "
    "with three lists:\n\nOn Tuesday, Mayor Helen Ortiz announced that Northwind Energy will open "
    "a battery plant on the outskirts of Greenfield, creating about 600 jobs. The announcement "
    "followed months of negotiations involving the State Development Agency and the local "
    "carpenters' union. Union spokesperson Daniel Okafor said the agreement includes training "
    "programmes with Greenfield Community College. Construction is expected to start in spring. "
    "Critics, including the Riverside Residents Association, have raised concerns about truck "
    "traffic on Mill Road and asked the Environmental Protection Office to review the plans. "
    "Northwind's chief executive, Sara Lindqvist, said the company would publish a traffic study "
    "before the planning hearing in Harlow County next month. "
    "Also add a fourth list for dates and events mentioned in the text, and make sure that names "
    "which appear twice are listed only once.",
    "Classify each of these customer messages as 'billing', 'technical', 'shipping' or 'other', "
    "and give a one-line reason for each:\n1. My invoice shows two charges for March.\n2. The app "
    "crashes whenever I open the camera.\n3. The parcel tracking hasn't updated in six days.\n"
    "4. Do you sponsor local football teams?\n5. I was charged after cancelling my plan.\n"
    "6. The website won't load on my tablet.\n7. Can I change the delivery address after "
    "ordering?\n8. The discount code from your newsletter says it's invalid.\n9. Do you have "
    "a shop in Leeds?\n10. My password reset email never arrives.\nFinally, tell me which "
    "category is most common and suggest one improvement that would reduce those messages.",
    "Fix the grammar and make this text more professional without changing its meaning:\n\n"
    "hey all, so basically the server was down yesterday for like 3 hours cause the certificate "
    "expired and nobody noticed, which is bad. we fixed it now but we gotta set up some kind of "
    "reminder or auto renew thing so it dont happen again. also sorry to the sales team who "
    "couldnt do there demos. anyway the root cause was that the renewal emails went to a "
    "mailbox of someone who left in january. going forward i think ops should own all "
    "certificates and we should list them in the wiki with expiry dates. lmk if anyone "
    "disagrees, otherwise i'll set it up next week. thanks for jumping on it so fast yesterday, "
    "esp ravi and li. "
    "It will be posted in the engineering channel, which includes managers, so it should be clear "
    "and calm, but it shouldn't sound stiff. Please keep the thanks at the end and use short "
    "paragraphs.",
    "Turn these rough notes into a clear paragraph for a project status update:\n\n- login page "
    "redesign done, in testing\n- payment integration blocked, waiting on API keys from vendor\n"
    "- 2 bugs in search (typos not tolerated, slow on long queries)\n- demo to client moved to the "
    "15th\n- need decision on dark mode: now or next release?\n- QA found accessibility issues: "
    "contrast on buttons, missing alt text on icons\n- budget: 70% spent, 60% of scope done\n"
    "- new dev (Marta) joins Monday, needs laptop + access\n- risk: vendor API keys may take "
    "another 2 weeks -> payment launch slips\nThe audience is the client's product owner, so "
    "keep it factual, say what we need from them, and keep it to two short paragraphs.",
    # --- explanations and advice
    "Explain the difference between a process and a thread, with an everyday analogy, and say when "
    "I would choose one over the other in a Python web application. Our app is a Flask service "
    "that resizes uploaded images and also calls two slow external APIs for each request. "
    "Someone on my team said the GIL makes threads useless in Python, and someone else said "
    "we should just use asyncio instead of either. Who is right, and does the answer differ for "
    "the image resizing and for the API calls? Please keep it practical and mention how Gunicorn "
    "workers fit into this picture. "
    "We deploy on two small virtual machines with four cores each, and the image resizing takes "
    "about 300 ms of CPU per upload, while each API call mostly waits about a second on the network. "
    "I'd also appreciate a short summary at the end with a recommendation for our case, and a note "
    "on what we should measure before and after the change to know whether it helped.",
    "I'm training for my first 10 km run in eight weeks. I can currently run 3 km without "
    "stopping. I can train four days a week. Give me a simple week-by-week plan and a few tips on "
    "avoiding injury. Some background: I'm 38, I cycle to work (about 20 minutes each way), and "
    "I had a mild knee problem two years ago that went away with physiotherapy. I usually run "
    "on pavements but there's a park with gravel paths near my home. I'd like to finish the "
    "race in under 65 minutes if possible, but mainly I want to finish without walking. Should "
    "I also do strength training, and what should I eat the morning of the race? "
    "My weekends are usually free, but on Wednesdays I can only run late in the evening. Please "
    "format the plan as a table with one row per week.",
    "What are the main causes of the seasons on Earth? A friend insists it's because the Earth is "
    "closer to the Sun in summer. Explain why that's wrong in a way that would convince them, "
    "and mention what happens in the southern hemisphere. He also says that if it were about "
    "tilt, the equator would have the strongest seasons. I'd like an explanation with a simple "
    "experiment we could do at home with a torch and a ball, and a sentence about why the days "
    "are longer in summer. He's a smart person who just never learned this, so please don't be "
    "condescending. "
    "If possible, also explain why the hottest days of the year usually come several weeks after the "
    "longest day, since he'll probably ask about that next. "
    "The torch-and-ball experiment should need nothing more than things most people have at home, "
    "and please describe what we should expect to see at each step so we know if we did it right.",
    "My tomato plants have yellow leaves at the bottom and some brown spots with rings on them. "
    "They're in pots on a sunny balcony and I water them every evening. What could be wrong and "
    "what should I do? The plants are about a metre tall and have started to set fruit. The "
    "pots are around 10 litres each, and I used a general-purpose compost when I planted them "
    "in May. I haven't fed them since. The balcony gets strong afternoon sun and it's been very "
    "humid lately, with a few thunderstorms. A neighbour's plants two floors down have the same "
    "problem. Is it safe to eat the tomatoes that are already forming, and should I remove the "
    "affected leaves? "
    "I'd also like to know how often I should water them in a heatwave, whether watering in the "
    "evening is a bad idea, and which kind of fertiliser to buy at a garden centre.",
    "Compare renting and buying a home for someone who expects to move cities in about three years. "
    "Cover costs, flexibility and risk, and end with a short recommendation. For context: the "
    "flat I'm looking at costs 280,000, I have a 15% deposit saved, a comparable flat rents for "
    "1,150 a month, and mortgage rates are currently around 4.5%. Buying and selling would cost "
    "me roughly 4% of the price in fees and taxes each way. House prices here rose about 3% a "
    "year over the last decade, but I know that's no guarantee. Could renting the flat out after "
    "I move be a reasonable plan? "
    "I'm 31, my job is fairly secure, and I have no other debts besides a small car loan that ends next year. "
    "I also care about not being tied down emotionally to one place, and I don't enjoy dealing with "
    "maintenance and repairs myself.",
    # --- planning and structured output
    "Plan a three-day trip to Lisbon for two people who like food, history and walking, on a "
    "moderate budget. Give a day-by-day itinerary with morning, afternoon and evening, and one "
    "tip about getting around. We arrive on a Thursday at 11:00 and leave on Sunday evening. "
    "One of us doesn't eat meat but eats fish. We'd like one evening with live fado music, a "
    "half-day trip outside the city if it's easy by train, and we want to avoid the longest "
    "queues at the big monuments. We're fine with hills but not with very long days, so please "
    "leave some time to rest in the afternoons. "
    "Please include approximate costs for the main entrance fees and a rough daily budget for food "
    "for two, and suggest one neighbourhood that would be a good base.",
    "Create a simple weekly meal plan for a vegetarian family of four with two young children. "
    "Dinners only, Monday to Friday, each under 40 minutes to cook, and list the shopping items "
    "needed for the week grouped by aisle. One child doesn't like anything spicy and the other "
    "is allergic to peanuts. We have a slow cooker and an oven but no air fryer. We'd like to "
    "cook a bigger batch on Monday and reuse part of it later in the week, and we try to keep "
    "the weekly food budget around 90. Please mark which dinners the kids could help prepare. "
    "Vegetables the children already like: carrots, peas, sweetcorn, cucumber and broccoli when it's "
    "hidden in a sauce. We don't eat tofu, but eggs, cheese and beans are all fine. "
    "Please keep the recipes simple: we're both working parents and on busy evenings we only have "
    "about half an hour between getting home and the children's bedtime routine.",
]


def conversation(i: int) -> list[Message]:
    """Request i's conversation: PROMPTS cycled, with a tag at the start of the user message on
    each repetition so that repeats don't share prompt blocks beyond the system prompt."""
    text = PROMPTS[i % len(PROMPTS)]
    copy = i // len(PROMPTS)
    if copy:
        text = f"(copy {copy}) {text}"
    return [{"role": "user", "content": text}]


def output_lengths(n: int, seed: int = 6, low: int = 64, high: int = 256) -> list[int]:
    """Deterministic max_tokens per request in [low, high]: a triangular draw peaking at 148
    (mean (64 + 256 + 148) / 3 = 156; seed 6 gives 156.9 over the first 32)."""
    rng = random.Random(seed)
    return [round(rng.triangular(low, high, 148)) for _ in range(n)]
